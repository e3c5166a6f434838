"""pytest options, the ``fb_bench`` fixture and the end-of-run report. See bench/harness.py."""
from __future__ import annotations

import datetime
import os
import re

import pytest
import torch

from bench.harness import BenchConfig, FbBench, device_name

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    g = parser.getgroup("fastblocks bench")
    g.addoption("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device to benchmark")
    g.addoption("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                help="input dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.addoption("--layout", default="channels_last", choices=["channels_last", "contiguous"])
    g.addoption("--size", default="auto", choices=["auto", "quick", "full"],
                help="case sizes (auto: full on CUDA, quick on CPU)")
    g.addoption("--rounds", type=int, default=None, help="timed rounds per case (default 50 CUDA / 15 CPU)")
    g.addoption("--compile-models", action="store_true",
                help="torch.compile whole models also with --size quick (minutes per model on a CPU)")
    g.addoption("--results-dir", default=RESULTS_DIR, help="where the JSON, Markdown and PNG go")


def _config(config) -> BenchConfig:
    dev = config.getoption("--device")
    device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda but no CUDA device is visible")
    dtype = config.getoption("--dtype")
    dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = config.getoption("--size")
    size = size if size != "auto" else ("full" if device.type == "cuda" else "quick")
    return BenchConfig(device, dtype, config.getoption("--layout"), size, config.getoption("--rounds"),
                       config.getoption("--compile-models"))


@pytest.fixture(scope="session")
def bench_config(request) -> BenchConfig:
    return _config(request.config)


@pytest.fixture
def fb_bench(benchmark, bench_config, request):
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def progress(msg: str):
        with capture.global_and_fixture_disabled():
            reporter.write_line(msg)

    return FbBench(benchmark, bench_config, progress)


def pytest_report_header(config):
    cfg = _config(config)
    return (f"fastblocks bench: {device_name(cfg.device)}, {cfg.dtype}, {cfg.layout}, size={cfg.size}; "
            f"results -> {config.getoption('--results-dir')}")


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(bs, "benchmarks", []) if b.stats]
    if not benchmarks:
        return
    from bench import report

    cfg = _config(session.config)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(cfg.device)).strip("-").lower()
    stem = os.path.join(session.config.getoption("--results-dir"),
                        f"{slug}-{str(cfg.dtype).removeprefix('torch.')}-{cfg.layout}-{datetime.datetime.now():%Y-%m-%d}")
    data = {
        "machine_info": bs.machine_info if isinstance(getattr(bs, "machine_info", None), dict) else {},
        "datetime": datetime.datetime.now().isoformat(),
        "benchmarks": [b.as_dict(include_data=False) for b in benchmarks],
    }
    paths = report.write_all(data, stem)
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    reporter.write_line("")
    reporter.write_line(report.markdown(data, headline_only=True))
    reporter.write_line("fastblocks bench results: " + ", ".join(paths))
