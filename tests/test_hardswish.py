"""hard-swish, hard-sigmoid and the hard-sigmoid gate against PyTorch, for every backend."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastblocks
from fastblocks import ops
from fastblocks.ops.hardswish import hardsigmoid_gate_reference
from tests.conftest import require_backend

ACTS = {"hardswish": (ops.hardswish, F.hardswish), "hardsigmoid": (ops.hardsigmoid, F.hardsigmoid)}
KINKS = torch.tensor([-4.0, -3.0, -2.5, 0.0, 2.5, 3.0, 4.0])


def _input(shape, dtype, device, layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 4
    if x.numel() >= KINKS.numel():
        x.view(-1)[: KINKS.numel()] = KINKS.to(device, torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # non-dense: every other column
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 17, 1, 1), (3, 40, 9, 9)])
def test_activation_matches_pytorch(name, backend, device, layout, shape):
    require_backend(name, backend, device)
    fb, ref = ACTS[name]
    x = _input(shape, torch.float32, device, layout).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = fb(x, impl=backend)
    yr = ref(xr)
    assert y.shape == yr.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("name", list(ACTS))
def test_gradient_at_kinks_follows_pytorch(name, backend, device):
    require_backend(name, backend, device, torch.float64)
    fb, ref = ACTS[name]
    x = KINKS.to(device, torch.float64).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    fb(x, impl=backend).sum().backward()
    ref(xr).sum().backward()
    # aten's fp64 hardsigmoid' is float32(1/6); the branch taken at each kink is what matters
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=0)


def test_nan_propagates_like_pytorch(backend, device):
    require_backend("hardswish", backend, device)
    x = torch.tensor([float("nan"), -4.0, 1.0, 5.0], device=device).view(1, 4, 1, 1)
    for name, (op, ref) in ACTS.items():
        torch.testing.assert_close(op(x, impl=backend), ref(x), equal_nan=True, msg=name)
    torch.testing.assert_close(ops.hardsigmoid_gate(x.expand(2, 4, 3, 3), x.view(1, 4).expand(2, 4), impl=backend),
                               hardsigmoid_gate_reference(x.expand(2, 4, 3, 3), x.view(1, 4).expand(2, 4)), equal_nan=True)


@pytest.mark.parametrize("name", list(ACTS))
def test_activation_gradcheck(name, backend, device):
    require_backend(name, backend, device, torch.float64)
    fb, _ = ACTS[name]
    # away from the kinks, where the function is not differentiable
    x = torch.tensor([-5.0, -2.9, -1.0, 0.3, 1.7, 2.9, 5.0], dtype=torch.float64, device=device)
    x = x.reshape(1, 7, 1, 1).repeat(2, 1, 2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fb(t, impl=backend), (x,))


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_eager(name, backend, device, dtype):
    require_backend(name, backend, device, dtype)
    fb, ref = ACTS[name]
    x = _input((4, 24, 13, 13), dtype, device)
    exact = ref(x.double())
    err_fb = (fb(x, impl=backend).double() - exact).abs().max()
    err_eager = (ref(x).double() - exact).abs().max()
    assert err_fb <= 2 * err_eager + 1e-6


@pytest.mark.parametrize("name", list(ACTS))
def test_empty_tensor(name, backend, device):
    require_backend(name, backend, device)
    fb, _ = ACTS[name]
    x = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
    y = fb(x, impl=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", list(ACTS))
def test_opcheck(name, backend):
    require_backend(name, backend)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    op = getattr(torch.ops.fastblocks, name)
    torch.library.opcheck(op.default, (x, backend))
    bwd = getattr(torch.ops.fastblocks, f"{name}_backward")
    torch.library.opcheck(bwd.default, (torch.randn_like(x), x.detach(), backend))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("g_shape", ["nc", "nc11"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 40, 7, 7), (3, 70, 2, 3)])
def test_gate_matches_reference(backend, device, layout, g_shape, shape):
    require_backend("hardsigmoid_gate", backend, device)
    x = _input(shape, torch.float32, device, layout).requires_grad_()
    N, C = shape[:2]
    g = (torch.randn(N, C, device=device) * 4)
    g.view(-1)[:3] = torch.tensor([-3.0, 0.0, 3.0])
    g = (g if g_shape == "nc" else g[:, :, None, None]).requires_grad_()
    xr, gr = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    y = ops.hardsigmoid_gate(x, g, impl=backend)
    yr = hardsigmoid_gate_reference(xr, gr)
    torch.testing.assert_close(y, yr)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(g.grad, gr.grad, rtol=1e-4, atol=1e-4)


def test_gate_gradcheck(backend, device):
    require_backend("hardsigmoid_gate", backend, device, torch.float64)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    g = (torch.rand(2, 5, dtype=torch.float64, device=device) * 5 - 2.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.hardsigmoid_gate(a, b, impl=backend), (x, g))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.hardsigmoid_gate(a, b, impl=backend), (xl, g))


def test_gate_opcheck(backend):
    require_backend("hardsigmoid_gate", backend)
    x = torch.randn(2, 6, 3, 5, requires_grad=True)
    g = torch.randn(2, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.fastblocks.hardsigmoid_gate.default, (x, g, backend))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastblocks.hardsigmoid_gate.default, (xl, g, backend))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.hardswish(torch.arange(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.hardsigmoid([1.0, 2.0])
    with pytest.raises(ValueError, match="impl= must be one of"):
        ops.hardswish(torch.randn(3), impl="fast")
    with pytest.raises(fastblocks.BackendUnavailable, match="cuda backend runs CUDA tensors|without CUDA|not built"):
        ops.hardswish(torch.randn(3), impl="cuda")
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ops.hardsigmoid_gate(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="g must have shape"):
        ops.hardsigmoid_gate(torch.randn(2, 3, 4, 4), torch.randn(3, 2))
    with pytest.raises(TypeError, match="g must have x's dtype"):
        ops.hardsigmoid_gate(torch.randn(2, 3, 4, 4), torch.randn(2, 3, dtype=torch.float64))


def test_interpreter_refuses_low_precision_triton():
    from fastblocks.ops._triton import INTERPRET, TRITON_ERROR

    if TRITON_ERROR or not INTERPRET:
        pytest.skip("needs Triton under TRITON_INTERPRET=1")
    with pytest.raises(fastblocks.BackendUnavailable, match="float32 and float64 only"):
        ops.hardswish(torch.randn(3, dtype=torch.bfloat16), impl="triton")


def test_env_var_precedence(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("FASTBLOCKS_IMPL", "bogus")
    with pytest.raises(ValueError, match="FASTBLOCKS_IMPL must be one of"):
        ops.hardswish(x)
    monkeypatch.setenv("FASTBLOCKS_IMPL_HARDSWISH", "torch")
    torch.testing.assert_close(ops.hardswish(x), F.hardswish(x))  # per-op beats global
    torch.testing.assert_close(ops.hardswish(x, impl="torch"), F.hardswish(x))  # explicit beats both
    with pytest.raises(ValueError, match="FASTBLOCKS_IMPL must be one of"):
        ops.hardsigmoid(x)


def test_modules_are_drop_in(backend):
    require_backend("hardswish", backend)
    x = torch.randn(2, 8, 5, 5)
    for fb_cls, ref_cls in [(fastblocks.nn.HardSwish, torch.nn.Hardswish),
                            (fastblocks.nn.HardSigmoid, torch.nn.Hardsigmoid)]:
        m = fb_cls(inplace=True, impl=backend)
        assert isinstance(m, ref_cls)
        torch.testing.assert_close(m(x), ref_cls()(x))
    assert "impl='" in repr(fastblocks.nn.HardSwish())


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
def test_compile_fullgraph(compile_backend):
    require_backend("hardswish", compile_backend)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), fastblocks.nn.HardSwish(impl=compile_backend),
                                fastblocks.nn.HardSigmoid(impl=compile_backend))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert x.grad is not None


def test_backends_report(capsys):
    report = fastblocks.backends()
    assert report["hardswish"]["cpu"]["torch"] is None
    assert "hardsigmoid_gate" in report
    assert "auto ->" in capsys.readouterr().out


def test_import_without_extension_warns_once_and_torch_backend_works():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fastblocks._C"] = None  # as if the extension were not built
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, fastblocks
            fastblocks.ops.hardswish(torch.randn(3))  # auto falls back to torch
        msgs = [str(m.message) for m in w if "fastblocks" in str(m.message)]
        assert sum("_C" in m for m in msgs) == 1, msgs
        assert fastblocks.backends(verbose=False)["hardswish"]["cpu"]["cpp"] is not None
        try:
            fastblocks.ops.hardswish(torch.randn(3), impl="cpp")
        except fastblocks.BackendUnavailable as e:
            assert "pip install --no-build-isolation -e ." in str(e), e
        else:
            raise AssertionError("impl='cpp' should fail without the extension")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_custom_op_skips_its_registration_only_in_plain_eager_calls():
    """CustomOp runs its implementation directly (no autograd: as is; autograd: in a Function of its
    own) and the registered op under FakeTensorMode and torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from fastblocks.ops._common import CustomOp

    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    op = CustomOp("fastblocks_test::triple", triple)
    op.register_fake(lambda x: torch.empty_like(x))
    op.register_autograd(lambda ctx, grad: grad * 3, setup_context=lambda ctx, inputs, output: None)

    def dispatched(*args) -> tuple[torch.Tensor, bool]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = op(*args)
        return y, any(e.name == "fastblocks_test::triple" for e in prof.events())

    x = torch.randn(5)
    y, through_op = dispatched(x)
    assert not through_op and y.grad_fn is None and torch.equal(y, x * 3)
    xg = x.clone().requires_grad_()
    y, through_op = dispatched(xg)
    assert not through_op and type(y.grad_fn).__name__ == "tripleBackward"
    y.sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, 3.0))
    with FakeTensorMode() as mode:
        assert isinstance(op(mode.from_tensor(x)), FakeTensor)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    assert torch.equal(torch.compile(lambda t: op(t) + 1, backend=backend, fullgraph=True)(x), x * 3 + 1)
    assert any(n.target is torch.ops.fastblocks_test.triple.default for n in graphs[0].graph.nodes)
