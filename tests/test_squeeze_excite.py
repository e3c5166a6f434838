"""Fused squeeze-excite against torchvision's SqueezeExcitation, for every backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import fastblocks
from fastblocks import ops
from fastblocks.nn import SqueezeExcite
from tests.conftest import require_backend

OP = "squeeze_excite"
# (activation, scale activation): EfficientNet, MobileNetV3
PAIRS = {"silu+sigmoid": (nn.SiLU, nn.Sigmoid), "relu+hardsigmoid": (nn.ReLU, nn.Hardsigmoid)}


def _pair(se: SqueezeExcite, ref: SqueezeExcitation) -> None:
    ref.load_state_dict(se.state_dict())


def _modules(C, S, pair, backend, dtype, device):
    act, scale = PAIRS[pair]
    se = SqueezeExcite(C, S, act, scale, impl=backend).to(device, dtype)
    with torch.no_grad():  # biases spread so that hardsigmoid has gates on both flat parts and the slope
        se.fc2.bias.uniform_(-4, 4)
    ref = SqueezeExcitation(C, S, act, scale).to(device, dtype)
    _pair(se, ref)
    return se, ref


def _input(shape, dtype, device, layout):
    x = torch.randn(shape, dtype=dtype, device=device) + 0.5  # nonzero mean: the pool matters
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run(m, x, dy):
    """Output and the gradients of x and of every parameter."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad.clone() for p in m.parameters()]


def _tolerances(dtype, pair):
    if dtype == torch.float64:
        # aten's fp64 hardsigmoid' is float32(1/6); the kernels use the exact 1/6
        return dict(rtol=1e-6, atol=1e-9) if "hardsigmoid" in pair else dict(rtol=1e-9, atol=1e-11)
    return dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 12, 7, 7), (1, 20, 14, 14), (3, 5, 3, 5), (2, 8, 24, 24)])
def test_matches_torchvision(backend, device, dtype, pair, layout, shape):
    require_backend(OP, backend, device, dtype)
    N, C = shape[:2]
    se, ref = _modules(C, max(1, C // 4), pair, backend, dtype, device)
    x = _input(shape, dtype, device, layout)
    dy = torch.randn_like(x)
    y, grads = _run(se, x, dy)
    y_ref, grads_ref = _run(ref, x, dy)
    tol = _tolerances(dtype, pair)
    torch.testing.assert_close(y, y_ref, **tol)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    for name, g, g_ref in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("pair", list(PAIRS))
def test_gradcheck(backend, device, pair):
    require_backend(OP, backend, device, torch.float64)
    act, scale = [n for n in pair.split("+")]
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in [(2, 4), (2,), (4, 2), (4,)]]
    with torch.no_grad():
        params[1].add_(0.5)  # keep relu's inputs off the kink at 0
        params[3].mul_(2)

    def f(x, w1, b1, w2, b2):
        return ops.squeeze_excite(x, w1, b1, w2, b2, act, scale, impl=backend)

    fast = backend == "triton" and device.type == "cpu"  # the interpreter is slow: random projections only
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=fast)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(f, (xl, *params), fast_mode=fast)


def test_opcheck(backend):
    require_backend(OP, backend)
    for layout in ["contiguous", "channels_last"]:
        x = _input((2, 6, 3, 5), torch.float32, "cpu", layout).requires_grad_()
        params = [torch.randn(s, requires_grad=True) for s in [(3, 6), (3,), (6, 3), (6,)]]
        torch.library.opcheck(torch.ops.fastblocks.squeeze_excite.default, (x, *params, "silu", "sigmoid", backend))
        torch.library.opcheck(torch.ops.fastblocks.squeeze_excite_backward.default,
                              (torch.randn_like(x), x.detach(), *[p.detach() for p in params], "relu", "hardsigmoid",
                               backend))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_low_precision_error_within_twice_eager(backend, device, dtype, pair):
    require_backend(OP, backend, device, dtype)
    se, ref = _modules(24, 6, pair, backend, torch.float64, device)
    x = _input((4, 24, 9, 9), torch.float64, device, "contiguous")
    dy = torch.randn_like(x)
    exact_y, exact_grads = _run(ref, x, dy)
    se, ref = se.to(dtype), ref.to(dtype)
    y, grads = _run(se, x.to(dtype), dy.to(dtype))
    y_eager, grads_eager = _run(ref, x.to(dtype), dy.to(dtype))
    for name, ours, eager, exact in zip(["y", "x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
                                        [y] + grads, [y_eager] + grads_eager, [exact_y] + exact_grads):
        err = (ours.double() - exact).abs().max()
        err_eager = (eager.double() - exact).abs().max()
        assert err <= 2 * err_eager + 1e-6 * exact.abs().max(), (name, err.item(), err_eager.item())


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph(compile_backend, layout):
    require_backend(OP, compile_backend)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(8, 8, 1), SqueezeExcite(8, 2, nn.SiLU, impl=compile_backend),
                          SqueezeExcite(8, 4, nn.ReLU, nn.Hardsigmoid, impl=compile_backend))
    x = _input((2, 8, 5, 5), torch.float32, "cpu", layout).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    model(x).sum().backward()
    for g, g_ref in zip(grads, [x.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, g_ref)


def test_empty_batch(backend):
    require_backend(OP, backend)
    se = SqueezeExcite(6, 2, impl=backend)
    x = torch.empty(0, 6, 4, 4, requires_grad=True)
    y = se(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(se.fc1.weight.grad, torch.zeros_like(se.fc1.weight))


def test_non_dense_input_is_handled(backend):
    require_backend(OP, backend)
    se, ref = _modules(6, 2, "silu+sigmoid", backend, torch.float32, "cpu")
    x = torch.randn(2, 6, 5, 10)[..., ::2]  # every other column: neither layout
    torch.testing.assert_close(se(x), ref(x))


def test_weights_in_another_dtype(backend):
    """fp32 weights with bf16 activations (as under autocast): the excitation runs in fp32 anyway."""
    require_backend(OP, backend, dtype=torch.bfloat16)
    se, ref = _modules(8, 2, "silu+sigmoid", backend, torch.float32, "cpu")
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    y = se(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x.detach().float()), rtol=2e-2, atol=2e-2)
    y.sum().backward()
    assert se.fc1.weight.grad.dtype == torch.float32


def test_bad_inputs_give_clear_errors():
    x = torch.randn(2, 6, 4, 4)
    w1, b1, w2, b2 = torch.randn(3, 6), torch.randn(3), torch.randn(6, 3), torch.randn(6)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ops.squeeze_excite(torch.randn(6, 4, 4), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.squeeze_excite(torch.ones(2, 6, 4, 4, dtype=torch.long), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="x must have at least one pixel"):
        ops.squeeze_excite(torch.randn(2, 6, 0, 4), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1 must have shape \[3, 6\]"):
        ops.squeeze_excite(x, torch.randn(3, 5), b1, w2, b2)
    with pytest.raises(ValueError, match=r"b1 must have shape \[3\]"):
        ops.squeeze_excite(x, w1, torch.randn(4), w2, b2)
    with pytest.raises(ValueError, match=r"w2 must have shape \[6, 3\]"):
        ops.squeeze_excite(x, w1, b1, torch.randn(3, 6), b2)
    with pytest.raises(TypeError, match="b2 must be a torch.Tensor"):
        ops.squeeze_excite(x, w1, b1, w2, [0.0] * 6)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.squeeze_excite(x, w1, b1, w2, b2, activation="gelu")
    with pytest.raises(ValueError, match="scale_activation must be one of"):
        ops.squeeze_excite(x, w1, b1, w2, b2, scale_activation="tanh")
    with pytest.raises(ValueError, match="impl= must be one of"):
        ops.squeeze_excite(x, w1, b1, w2, b2, impl="fast")
    with pytest.raises(fastblocks.BackendUnavailable, match="cuda backend runs CUDA tensors|without CUDA|not built"):
        ops.squeeze_excite(x, w1, b1, w2, b2, impl="cuda")
    with pytest.raises(ValueError, match="activation GELU is not supported"):
        SqueezeExcite(6, 3, nn.GELU)
    with pytest.raises(ValueError, match="scale_activation 'tanh' is not supported"):
        SqueezeExcite(6, 3, scale_activation="tanh")


def test_extension_checks_its_arguments():
    """The raw kernels refuse bad calls with an error instead of crashing."""
    require_backend(OP, "cpp")
    fwd = torch.ops.fastblocks_ext.squeeze_excite_forward
    x, w1, b1, w2, b2 = torch.randn(2, 6, 4, 4), torch.randn(3, 6), torch.randn(3), torch.randn(6, 3), torch.randn(6)
    with pytest.raises(RuntimeError, match="w2 must be"):
        fwd(x, w1, b1, torch.randn(6, 2), b2, 1, False)
    with pytest.raises(RuntimeError, match="activation must be a code"):
        fwd(x, w1, b1, w2, b2, 9, False)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fwd(x[..., ::2], w1, b1, w2, b2, 1, False)
    with pytest.raises(RuntimeError, match="grad and x must have the same"):
        torch.ops.fastblocks_ext.squeeze_excite_backward(torch.randn(2, 6, 4, 3), x, w1, b1, w2, b2, 1, False)


def test_module_is_drop_in():
    ref = SqueezeExcitation(16, 4)
    se = SqueezeExcite(16, 4)
    assert se.state_dict().keys() == ref.state_dict().keys()
    assert [t.shape for t in se.state_dict().values()] == [t.shape for t in ref.state_dict().values()]
    se.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(se(x), ref(x))
    assert "impl='auto'" in repr(se)
    # activations as classes, instances and names
    for act, scale in [(nn.SiLU(inplace=True), "hard_sigmoid"), ("swish", nn.Hardsigmoid()), (nn.ReLU6, nn.Sigmoid)]:
        SqueezeExcite(16, 4, act, scale)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_from_torchvision(pair):
    ref = SqueezeExcitation(12, 3, *PAIRS[pair]).double().eval()
    se = SqueezeExcite.from_module(ref)
    assert not se.training and se.fc1.weight.dtype == torch.float64
    assert (se.act_name, se.scale_act_name) == tuple(pair.split("+"))
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(se(x), ref(x))


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
def test_from_timm(gate):
    timm = pytest.importorskip("timm")
    from timm.layers import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite as TimmSE

    x = torch.randn(2, 16, 6, 6)
    for m in [TimmSE(16, rd_ratio=0.25, act_layer=nn.SiLU, gate_layer=timm.layers.get_act_layer(gate)),
              SEModule(16, rd_channels=4, gate_layer=gate)]:
        se = SqueezeExcite.from_module(m)
        assert se.scale_act_name == gate.replace("_", "")
        torch.testing.assert_close(se(x), m(x))
    with pytest.raises(ValueError, match="not supported"):
        SqueezeExcite.from_module(SEModule(16, rd_channels=4, add_maxpool=True))
    with pytest.raises(TypeError, match="cannot convert"):
        SqueezeExcite.from_module(nn.Conv2d(3, 3, 1))


def test_backends_report():
    assert fastblocks.backends(verbose=False)[OP]["cpu"]["torch"] is None


# --- squeeze_excite_conv1x1: the SE and the 1x1 projection after it, SE output recomputed in backward ---

def _se_conv1x1_pair(C, O, pair, backend, dtype, device):
    se, ref_se = _modules(C, max(1, C // 4), pair, backend, dtype, device)
    proj = nn.Conv2d(C, O, 1, bias=False).to(device, dtype)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.se, self.proj = se, proj

        def forward(self, x):
            return self.se.forward_conv1x1(x, self.proj.weight)

    return Fused(), nn.Sequential(ref_se, proj)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 12, 7, 7), (1, 20, 5, 3)])
def test_se_conv1x1_matches_torchvision(backend, device, dtype, pair, layout, shape):
    require_backend(OP, backend, device, dtype)
    fused, ref = _se_conv1x1_pair(shape[1], 6, pair, backend, dtype, device)
    x = _input(shape, dtype, device, layout)
    dy = torch.randn(shape[0], 6, *shape[2:], dtype=dtype, device=device)
    y, grads = _run(fused, x, dy)
    y_ref, grads_ref = _run(ref, x, dy)
    tol = _tolerances(dtype, pair)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, g, g_ref in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "proj.weight"], grads,
                              grads_ref):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_se_conv1x1_saves_input_not_se_output(backend):
    require_backend(OP, backend)
    fused, ref = _se_conv1x1_pair(16, 8, "silu+sigmoid", backend, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    for m, expected in [(fused, 1), (ref, 2)]:  # torchvision: x for the SE and its output for the conv
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            m(x)
        assert sum(t.shape == x.shape for t in saved) == expected, type(m).__name__


def test_se_conv1x1_gradcheck_and_compile(backend):
    require_backend(OP, backend, dtype=torch.float64)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(2, 4), (2,), (4, 2), (4,), (3, 4, 1, 1)]]

    def f(x, w1, b1, w2, b2, w):
        return ops.squeeze_excite_conv1x1(x, w1, b1, w2, b2, w, "silu", "hardsigmoid", impl=backend)

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=backend == "triton")
    if backend != "triton":
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y = compiled(x, *params)
        grads = torch.autograd.grad(y.square().sum(), (x, *params))
        y_ref = f(x, *params)
        torch.testing.assert_close(y, y_ref)
        for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), (x, *params))):
            torch.testing.assert_close(g, g_ref)


def test_se_conv1x1_bad_weight():
    x = torch.randn(2, 8, 4, 4)
    params = [torch.randn(s) for s in [(2, 8), (2,), (8, 2), (8,)]]
    with pytest.raises(ValueError, match=r"weight must be a 1x1 conv weight \[O, 8, 1, 1\]"):
        ops.squeeze_excite_conv1x1(x, *params, torch.randn(4, 8, 3, 3))
    with pytest.raises(ValueError, match=r"weight must be a 1x1 conv weight \[O, 8, 1, 1\], got \(4, 8\)"):
        ops.squeeze_excite_conv1x1(x, *params, torch.randn(4, 8))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        ops.squeeze_excite_conv1x1(x, *params, torch.ones(4, 8, 1, 1, dtype=torch.int64))
