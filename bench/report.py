"""Ratio tables, chart and run comparison for fastblocks benchmark results.

    python -m bench.report show bench/results/<run>.json             # Markdown tables of one run
    python -m bench.report compare OLD.json NEW.json                  # per-case speed change NEW vs OLD
    python -m bench.report merge STEM A.json B.json ...               # one run written in parts -> STEM.*

Ratios are speedups: ``× eager`` = eager time / fastblocks time (> 1 means fastblocks is faster);
memory ratios are fastblocks / eager (< 1 means fastblocks uses less). A case's time is the statistic
the run recorded in ``extra_info["statistic"]``: the median of the rounds on a GPU, the minimum on a
CPU (see bench/harness.py), the median for files written before that field existed.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _groups(data: dict) -> dict[tuple, dict[str, dict]]:
    """{(op, case, pass): {variant: benchmark}} in first-seen order."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        groups[(info.get("op", b["name"]), info.get("case", ""), info.get("pass_", ""))][info.get("variant", b["name"])] = b
    return groups


def seconds(b: dict | None) -> float | None:
    """One benchmark's time: the statistic its run chose (median on a GPU, minimum on a CPU)."""
    return b["stats"][b.get("extra_info", {}).get("statistic", "median")] if b else None


def _ratio(num, den) -> str:
    return f"{num / den:.2f}" if num and den else "–"


def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if n else "–"


def best_fastblocks(variants: dict[str, dict]) -> tuple[str | None, dict | None]:
    fb = {v: b for v, b in variants.items() if v.startswith("fastblocks")}
    if not fb:
        return None, None
    name = min(fb, key=lambda v: seconds(fb[v]))
    return name, fb[name]


def headline_rows(data: dict) -> list[dict]:
    rows = []
    for (op, case, pass_), variants in _groups(data).items():
        eager, compiled = variants.get("eager"), variants.get("compile")
        name, fb = best_fastblocks(variants)
        info = fb["extra_info"] if fb else {}
        e_info = eager["extra_info"] if eager else {}
        rows.append({
            "op": op, "case": case, "pass": pass_, "best": name,
            "eager_ms": seconds(eager), "compile_ms": seconds(compiled), "fb_ms": seconds(fb),
            "x_eager": (seconds(eager) / seconds(fb)) if eager and fb else None,
            "x_compile": (seconds(compiled) / seconds(fb)) if compiled and fb else None,
            "peak_ratio": (info.get("peak_mem_bytes") / e_info["peak_mem_bytes"])
            if info.get("peak_mem_bytes") and e_info.get("peak_mem_bytes") else None,
            "saved_ratio": (info.get("saved_bytes") / e_info["saved_bytes"])
            if info.get("saved_bytes") and e_info.get("saved_bytes") else None,
            "copy_bw_frac": info.get("copy_bw_frac"),
            "items_per_s": info.get("items_per_s"),
        })
    return rows


def _fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def _cpu_line(info: dict) -> str:
    """The C++ CPU kernels' vector width, where the run recorded it."""
    width = info.get("cpu_simd_bytes")
    return f"; C++ CPU kernels with {width}-byte vectors" if width and "CPU" in info.get("device", "") else ""


def markdown(data: dict, headline_only: bool = False) -> str:
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    out = [f"## fastblocks benchmarks — {first.get('device', '?')}, {first.get('dtype', '?')}, "
           f"{first.get('layout', '?')}, size={first.get('size', '?')}",
           f"torch {first.get('torch')}, triton {first.get('triton')}, CUDA {first.get('cuda')}; "
           f"{data.get('datetime', '')[:16]}; times: {first.get('statistic', 'median')} of the rounds" + _cpu_line(first),
           "",
           "| op | case | pass | eager ms | compile ms | fastblocks ms (best) | × eager | × compile | "
           "peak mem fb/eager | saved fb/eager | copy BW | img/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in headline_rows(data):
        ms = lambda v: _fmt(v * 1e3 if v else None, ".3f")  # noqa: E731
        best = (r["best"] or "–").removeprefix("fastblocks-")
        bw = f"{r['copy_bw_frac']:.0%}" if r["copy_bw_frac"] else "–"
        out.append(f"| {r['op']} | {r['case']} | {r['pass']} | {ms(r['eager_ms'])} | {ms(r['compile_ms'])} | "
                   f"{ms(r['fb_ms'])} ({best}) | {_fmt(r['x_eager'])} | {_fmt(r['x_compile'])} | "
                   f"{_fmt(r['peak_ratio'])} | {_fmt(r['saved_ratio'])} | {bw} | {_fmt(r['items_per_s'], '.0f')} |")
    if headline_only:
        return "\n".join(out)
    out += ["", "### Every variant", "",
            f"| op | case | pass | variant | {first.get('statistic', 'median')} ms | × eager | × compile | GB/s | "
            "copy BW | peak MiB | "
            "saved MiB | items/s | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, case, pass_), variants in _groups(data).items():
        e, c = seconds(variants.get("eager")), seconds(variants.get("compile"))
        for v, b in variants.items():
            i, m = b["extra_info"], seconds(b)
            out.append(f"| {op} | {case} | {pass_} | {v} | {m * 1e3:.3f} | {_ratio(e, m)} | {_ratio(c, m)} | "
                       f"{i.get('gbps', '–')} | {i.get('copy_bw_frac', '–')} | {_mib(i.get('peak_mem_bytes'))} | "
                       f"{_mib(i.get('saved_bytes'))} | {i.get('items_per_s', '–')} | {i.get('compile_s', '–')} |")
    return "\n".join(out)


def chart(data: dict, path: str) -> str | None:
    """Bar chart of the best fastblocks speedup over eager and over torch.compile, per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in headline_rows(data) if r["x_eager"]]
    if not rows:
        return None
    labels = [f"{r['op']} {r['case']} {r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["x_eager"] for r in rows], height=0.4, label="× eager")
    ax.barh([y - 0.2 for y in ys], [r["x_compile"] or 0 for r in rows], height=0.4, label="× torch.compile")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the best fastblocks backend (higher is better)")
    first = data["benchmarks"][0]["extra_info"]
    ax.set_title(f"fastblocks — {first.get('device')}, {first.get('dtype')}, {first.get('layout')}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(data: dict, stem: str) -> list[str]:
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(data) + "\n")
    png = chart(data, stem + ".png")
    return [stem + ".json", stem + ".md"] + ([png] if png else [])


def compare(old: dict, new: dict) -> str:
    o = {b["fullname"]: b for b in old["benchmarks"]}
    lines = ["| benchmark | old ms | new ms | new speedup |", "|---|---|---|---|"]
    for b in new["benchmarks"]:
        if b["fullname"] in o:
            mo, mn = seconds(o[b["fullname"]]), seconds(b)
            lines.append(f"| {b['fullname'].split('::')[-1]} | {mo * 1e3:.3f} | {mn * 1e3:.3f} | {mo / mn:.2f}× |")
    return "\n".join(lines)


def merge(parts: list[dict]) -> dict:
    """One result set from a run made in parts (e.g. the phases of a GPU session on one machine): the
    benchmarks of all parts, a case measured again in a later part replacing the earlier one."""
    by_name = {}
    for data in parts:
        by_name.update({b["fullname"]: b for b in data["benchmarks"]})
    return {"machine_info": parts[0].get("machine_info", {}), "datetime": parts[-1]["datetime"],
            "benchmarks": list(by_name.values())}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print the Markdown tables of one result file")
    s.add_argument("json")
    c = sub.add_parser("compare", help="compare two result files case by case")
    c.add_argument("old")
    c.add_argument("new")
    m = sub.add_parser("merge", help="write STEM.json/.md/.png from the parts of one run")
    m.add_argument("stem")
    m.add_argument("parts", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "show":
        print(markdown(load(args.json)))
    elif args.cmd == "merge":
        print("\n".join(write_all(merge([load(f) for f in args.parts]), args.stem)))
    else:
        print(compare(load(args.old), load(args.new)))


if __name__ == "__main__":
    main()
