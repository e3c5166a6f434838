"""Fused depthwise conv + BatchNorm + activation against nn.Conv2d(groups=C) + nn.BatchNorm2d + activation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks import ops
from fastblocks.nn import DWConvBNAct
from tests.conftest import require_backend

OP = "dwconv_bn_act"
ACT_MODULES = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}

# (shape, kernel, stride, activation, eps, momentum, tiny): tiny cases also run on the Triton interpreter.
CASES = [
    ((2, 6, 7, 9), 3, 1, "silu", 1e-5, 0.1, True),
    ((1, 5, 8, 6), 5, 2, "hardswish", 1e-5, 0.1, True),   # N = 1, stride 2
    ((2, 3, 9, 7), 7, 2, "relu6", 1e-3, 0.01, True),
    ((3, 6, 5, 5), 3, 2, None, 1e-5, None, True),
    ((2, 96, 14, 14), 3, 2, "silu", 1e-3, 0.1, False),    # EfficientNet-B0 stage 2 depthwise, reduced
    ((2, 240, 10, 10), 5, 1, "silu", 1e-3, 0.1, False),   # EfficientNet-B0 stage 4 depthwise, reduced
    ((2, 72, 11, 11), 5, 2, "relu", 1e-3, 0.01, False),   # MobileNetV3-Large 72-channel 5x5, reduced
    ((1, 240, 7, 7), 3, 1, "hardswish", 1e-3, 0.01, False),  # MobileNetV3-Large 240-channel 3x3
    ((2, 40, 5, 23), 3, 1, "silu", 1e-5, 0.1, False),     # C % 16 != 0 with wide rows (CPU vector tails, pixel blocks)
    ((1, 24, 9, 30), 5, 2, "relu", 1e-5, 0.1, False),
    ((2, 32, 13, 16), 5, 1, "hardswish", 1e-5, 0.1, False),  # CPU register-blocked paths: 8-pixel runs (CL),
    ((1, 20, 12, 17), 7, 1, "relu6", 1e-3, 0.1, False),      # 8- and 4-row blocks plus leftover rows (NCHW)
    ((2, 8, 13, 12), 3, 1, "relu6", 1e-5, 0.1, False),  # NCHW output planes up to 12x12 run on a channels_last
    ((1, 8, 26, 27), 3, 2, "silu", 1e-5, 0.1, False),   # copy (C++); these two, above that, on the plane schedule
]


def _reference(C, k, stride, act, eps=1e-5, momentum=0.1, padding=None, dilation=1, dtype=torch.float32):
    padding = (k - 1) // 2 * dilation if padding is None else padding
    ref = nn.Sequential(nn.Conv2d(C, C, k, stride, padding, dilation, groups=C, bias=False),
                        nn.BatchNorm2d(C, eps, momentum), ACT_MODULES[act]()).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
        ref[1].running_mean.uniform_(-0.3, 0.3)
        ref[1].running_var.uniform_(0.5, 2.0)
    return ref


def _fused_like(ref, backend, act, **kw):
    conv = ref[0]
    m = DWConvBNAct(conv.in_channels, conv.kernel_size[0], conv.stride, conv.padding, conv.dilation, act,
                    ref[1].eps, ref[1].momentum, impl=backend, **kw).to(conv.weight.device, conv.weight.dtype)
    m.load_state_dict(ref.state_dict(), strict=False)  # the reference may hold an Identity at index 2
    return m


def _grads(m):
    return [m[0].weight.grad, m[1].weight.grad, m[1].bias.grad]


def _compare(ref, fused, x, train, steps=1, atol=1e-5, rtol=1e-4):
    ref.train(train)
    fused.train(train)
    for _ in range(steps):
        ref.zero_grad()
        fused.zero_grad()
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        assert yf.shape == yr.shape and yf.dtype == yr.dtype
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert yf.is_contiguous(memory_format=torch.channels_last)
        else:
            assert yf.is_contiguous()
        torch.testing.assert_close(yf, yr, atol=atol, rtol=rtol)
        dy = torch.randn_like(yr)
        yr.backward(dy)
        yf.backward(dy)
        torch.testing.assert_close(xf.grad, xr.grad, atol=atol, rtol=rtol)
        for gf, gr in zip(_grads(fused), _grads(ref)):
            assert (gf is None) == (gr is None)
            if gr is not None:
                torch.testing.assert_close(gf, gr, atol=atol * 10, rtol=rtol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused[1], name), getattr(ref[1], name), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}s{c[2]}-{c[3]}")
def test_matches_reference(backend, device, case, train, layout):
    shape, k, stride, act, eps, momentum, tiny = case
    require_backend(OP, backend, device)
    if backend == "triton" and device.type == "cpu" and not tiny:
        pytest.skip("the Triton interpreter runs tiny shapes only")
    ref = _reference(shape[1], k, stride, act, eps, momentum).to(device)
    fused = _fused_like(ref, backend, act)
    x = torch.randn(shape, device=device) + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _compare(ref, fused, x, train, steps=2 if train and backend != "triton" else 1)


@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
def test_running_stats_follow_batchnorm(backend, device, momentum):
    require_backend(OP, backend, device)
    ref = _reference(5, 3, 1, "relu", momentum=momentum).to(device)
    fused = _fused_like(ref, backend, "relu")
    _compare(ref, fused, torch.randn(2, 5, 6, 7, device=device) * 2 + 1, train=True, steps=3)
    assert int(fused[1].num_batches_tracked) == 3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding,dilation", [(0, 1), ((3, 0), (2, 1))])
def test_other_paddings_and_dilations(backend, device, padding, dilation, layout):
    require_backend(OP, backend, device)
    ref = _reference(20, 3, 1, "silu", padding=padding, dilation=dilation).to(device)
    fused = _fused_like(ref, backend, "silu")
    x = torch.randn(2, 20, 9, 14, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for train in (True, False):
        _compare(ref, fused, x, train)


def test_track_running_stats_false_and_no_affine(backend, device):
    require_backend(OP, backend, device)
    ref = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False),
                        nn.BatchNorm2d(4, affine=False, track_running_stats=False), nn.SiLU()).to(device)
    fused = DWConvBNAct.from_module(ref, impl=backend)
    x = torch.randn(2, 4, 5, 6, device=device)
    for train in (True, False):  # without running statistics, eval mode normalises with the batch too
        ref.train(train)
        fused.train(train)
        torch.testing.assert_close(fused(x), ref(x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k,stride,layout,hw", [(3, 1, "contiguous", (5, 4)), (5, 2, "channels_last", (5, 4)),
                                                 (3, 1, "contiguous", (13, 12))])  # C++: both NCHW schedules
def test_gradcheck(backend, device, train, layout, k, stride, hw):
    require_backend(OP, backend, device, torch.float64)
    if backend == "triton" and device.type == "cpu" and ((k == 3) != train or hw[0] > 5):
        pytest.skip("the Triton interpreter is slow: two of the six cases")
    C = 3
    x = torch.randn(2, C, *hw, dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, dtype=torch.float64, device=device) / k
    gamma = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    beta = torch.randn(C, dtype=torch.float64, device=device)
    rm = torch.randn(C, dtype=torch.float64, device=device) * 0.1
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5

    def f(x, w, gamma, beta):
        return ops.dwconv_bn_act(x, w, gamma, beta, None if train else rm, None if train else rv, train,
                                 stride=stride, activation="silu", impl=backend)

    inputs = [t.requires_grad_() for t in (x, w, gamma, beta)]
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


def test_gradients_at_activation_kinks_follow_pytorch(backend, device):
    """bn_weight = 0 makes the pre-activation exactly bn_bias, so every pixel sits on a kink."""
    require_backend(OP, backend, device, torch.float64)
    kinks = {"relu": [0.0, -1.0, 1.0], "relu6": [0.0, 6.0, 3.0], "hardswish": [-3.0, 3.0, 0.5]}
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=device)
    for act, values in kinks.items():
        beta = torch.tensor(values, dtype=torch.float64, device=device, requires_grad=True)
        beta_ref = beta.detach().clone().requires_grad_()
        gamma = torch.zeros(3, dtype=torch.float64, device=device)
        rm, rv = torch.zeros_like(gamma), torch.ones_like(gamma)
        ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, False, activation=act, impl=backend).sum().backward()
        ACT_MODULES[act]()(beta_ref[None, :, None, None].expand(2, 3, 5, 5)).sum().backward()
        torch.testing.assert_close(beta.grad, beta_ref.grad)


def test_opcheck(backend):
    require_backend(OP, backend)
    x = torch.randn(2, 4, 5, 6)
    w, g, b = torch.randn(4, 1, 3, 3), torch.rand(4) + 0.5, torch.randn(4)
    geom = ([2, 1], [1, 1], [1, 1])
    layouts = [torch.contiguous_format] if backend == "triton" else [torch.contiguous_format, torch.channels_last]
    for xx in (x.contiguous(memory_format=f) for f in layouts):  # the interpreter is slow: one layout
        xx = xx.requires_grad_()
        params = [t.clone().requires_grad_() for t in (w, g, b)]
        torch.library.opcheck(torch.ops.fastblocks.dwconv_bn_act_train.default,
                              (xx, *params, 1e-5, *geom, "hardswish", backend))
        torch.library.opcheck(torch.ops.fastblocks.dwconv_affine_act.default, (xx, *params, *geom, "silu", backend))
        y, mean, invstd = torch.ops.fastblocks.dwconv_bn_act_train(xx, w, g, b, 1e-5, *geom, "relu", backend)
        dy = torch.randn_like(y)
        torch.library.opcheck(torch.ops.fastblocks.dwconv_bn_act_train_backward.default,
                              (dy, xx.detach(), w, g, b, mean.detach(), invstd.detach(), *geom, "relu", backend))
        torch.library.opcheck(torch.ops.fastblocks.dwconv_affine_act_backward.default,
                              (dy, xx.detach(), w, g, b, *geom, "relu6", True, backend))


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
def test_compile_fullgraph(compile_backend):
    require_backend(OP, compile_backend)
    torch._dynamo.reset()
    ref = _reference(6, 3, 1, "silu")
    eager, compiled_module = _fused_like(ref, compile_backend, "silu"), _fused_like(ref, compile_backend, "silu")
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 7, 7)
    for train in (True, False):
        eager.train(train)
        compiled_module.train(train)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        ye.sum().backward()
        yc.sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(compiled_module[1].running_var, eager[1].running_var)


def _saved_bytes(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


@pytest.mark.parametrize("act", ["silu", "hardswish", "relu"])
def test_saves_at_most_half_of_eager_for_backward(act):
    ref = _reference(32, 3, 1, act)
    fused = _fused_like(ref, "torch", act)
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    eager_bytes, fused_bytes = _saved_bytes(ref, x), _saved_bytes(fused, x)
    # fused: x, the weights and per-channel mean / invstd; eager adds the conv and BN outputs
    assert fused_bytes <= 0.5 * eager_bytes, (fused_bytes, eager_bytes)
    assert fused_bytes < x.numel() * 4 * 1.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_low_precision_error_within_twice_eager(backend, device, dtype, train):
    require_backend(OP, backend, device, dtype)
    ref64 = _reference(24, 5, 1, "silu").double().to(device).train(train)
    ref = _reference(24, 5, 1, "silu").to(device, dtype).train(train)
    ref.load_state_dict(ref64.state_dict())
    fused = _fused_like(ref, backend, "silu").train(train)
    x = torch.randn(3, 24, 13, 13, device=device)
    exact = ref64(x.double())
    err_eager = (ref(x.to(dtype)).double() - exact).abs().max()
    err_fused = (fused(x.to(dtype)).double() - exact).abs().max()
    assert err_fused <= 2 * err_eager + 1e-6, (err_fused, err_eager)


def test_unsupported_kernel_size_falls_back_or_raises(recwarn):
    ref = _reference(4, 4, 1, "relu", padding=1)  # even kernel: torch backend only
    fused = _fused_like(ref, "auto", "relu")
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fused(x), ref(x))
    for backend in ("cpp", "triton"):
        with pytest.raises(fastblocks.BackendUnavailable, match="kernel sizes|TRITON_INTERPRET"):
            ops.dwconv_bn_act(x, ref[0].weight, None, None, None, None, True, padding=1, impl=backend)
    w = torch.randn(4, 1, 3, 5)  # non-square
    y = ops.dwconv_bn_act(x, w, None, None, None, None, True, activation="relu", impl="torch")
    torch.testing.assert_close(y, torch.relu(nn.functional.batch_norm(
        nn.functional.conv2d(x, w, padding=(1, 2), groups=4), None, None, training=True)))


def test_bad_inputs_give_clear_errors():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ops.dwconv_bn_act(torch.randn(4, 5, 5), w, None, None, None, None, True)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.dwconv_bn_act(x, w.double(), None, None, None, None, True)
    with pytest.raises(ValueError, match=r"weight must be a depthwise filter of shape \[C, 1, kH, kW\]"):
        ops.dwconv_bn_act(x, torch.randn(4, 4, 3, 3), None, None, None, None, True)
    with pytest.raises(ValueError, match=r"bn_weight must have shape \[C\]"):
        ops.dwconv_bn_act(x, w, torch.ones(3), None, None, None, True)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.dwconv_bn_act(x, w, None, None, None, None, True, activation="gelu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.dwconv_bn_act(torch.randn(1, 4, 1, 1), w, None, None, None, None, True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.dwconv_bn_act(x.long(), w, None, None, None, None, True)
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        ops.dwconv_bn_act(x, w, None, None, None, None, True, stride=(1, 2, 3))


def test_extension_checks_its_inputs():
    require_backend(OP, "cpp")
    from fastblocks import _ext

    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    fwd = _ext.op("dwconv_affine_act_forward")
    s = torch.ones(4)
    with pytest.raises(RuntimeError, match="kernel sizes 3, 5 and 7"):
        fwd(x, torch.randn(4, 1, 4, 4), s, s, [1, 1], [1, 1], [1, 1], 0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[C, 1, k, k\]"):
        fwd(x, torch.randn(3, 1, 3, 3), s, s, [1, 1], [1, 1], [1, 1], 0)
    with pytest.raises(RuntimeError, match="scale must be a contiguous"):
        fwd(x, w, torch.ones(5), s, [1, 1], [1, 1], [1, 1], 0)
    with pytest.raises(RuntimeError, match="weight must be contiguous Float"):
        fwd(x, w.double(), s, s, [1, 1], [1, 1], [1, 1], 0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        fwd(x, w, s, s, [1, 1], [1, 1], [1, 1], 9)
    with pytest.raises(RuntimeError, match="too small"):
        fwd(torch.randn(1, 4, 2, 2), w, s, s, [1, 1], [0, 0], [1, 1], 0)
    train_fwd = _ext.op("dwconv_bn_act_train_forward")
    with pytest.raises(RuntimeError, match="bn_weight must be a contiguous"):
        train_fwd(x, w, torch.ones(3), s, 1e-5, [1, 1], [1, 1], [1, 1], 0)
    with pytest.raises(RuntimeError, match="invstd must be a contiguous"):
        _ext.op("dwconv_bn_act_train_backward")(x, x, w, s, s, s, torch.ones(2, 2), [1, 1], [1, 1], [1, 1], 0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extension_statistics_of_degenerate_inputs(layout):
    """No pixels in x but output pixels from padding: their statistics are those of zeros. No output
    pixels at all (N = 0): NaN, as torch.mean of nothing; never a crash."""
    require_backend(OP, "cpp")
    from fastblocks import _ext

    stats = _ext.op("dwconv_bn_stats")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    w = torch.randn(3, 1, 3, 3)
    mean, var = stats(torch.zeros(2, 3, 0, 5).contiguous(memory_format=fmt), w, [1, 1], [2, 2], [1, 1])
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))
    for shape in [(0, 3, 4, 5), (0, 3, 20, 20)]:
        mean, var = stats(torch.zeros(shape).contiguous(memory_format=fmt), w, [1, 1], [1, 1], [1, 1])
        assert mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,k,stride", [((2, 8, 13, 12), 3, 1), ((2, 6, 17, 15), 5, 2)])
def test_cpu_training_passes_match_the_four_kernels(shape, k, stride, layout):
    """The C++ op per training pass (algebra in C++, small NCHW planes relayouted once) gives what the
    four kernels composed by tensor ops give."""
    require_backend(OP, "cpp")
    from fastblocks.ops.dwconv_bn_act import _CppKernels, _ExtKernels

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    w, gamma, beta = torch.randn(shape[1], 1, k, k), torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    geom = ([stride, stride], [k // 2, k // 2], [1, 1])
    fused, composed = _CppKernels(), _ExtKernels()
    out = fused.train_forward(x, w, gamma, beta, 1e-5, geom, "silu")
    for got, want in zip(out, composed.train_forward(x, w, gamma, beta, 1e-5, geom, "silu")):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()
    dy = torch.randn_like(out[0])
    args = (dy, x, w, gamma, beta, out[1], out[2], geom, "silu")
    for got, want in zip(fused.train_backward(*args), composed.train_backward(*args)):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


# ---- the module: drop-in construction and conversion ----

def test_state_dict_keys_match_torchvision():
    from torchvision.ops import Conv2dNormActivation

    tv = Conv2dNormActivation(16, 16, 5, 2, groups=16, activation_layer=nn.Hardswish, norm_layer=nn.BatchNorm2d)
    m = DWConvBNAct(16, 5, 2, activation="hardswish")
    assert list(m.state_dict()) == list(tv.state_dict())
    m.load_state_dict(tv.state_dict())
    tv.load_state_dict(m.state_dict())


@pytest.mark.parametrize("activation,name", [(nn.SiLU, "silu"), (nn.ReLU6(), "relu6"), ("relu", "relu"),
                                             (None, "none"), ("none", "none"), (fastblocks.nn.HardSwish, "hardswish")])
def test_activation_forms(activation, name):
    m = DWConvBNAct(4, activation=activation)
    assert m.activation == name
    assert len(m) == (2 if name == "none" else 3)


def test_from_module_conversions():
    from timm.layers import ConvNormAct
    from torchvision.ops import Conv2dNormActivation

    x = torch.randn(2, 8, 9, 9)
    sources = [Conv2dNormActivation(8, 8, 3, 2, groups=8, activation_layer=nn.Hardswish),
               nn.Sequential(nn.Conv2d(8, 8, 5, 1, 2, groups=8, bias=False), nn.BatchNorm2d(8, 1e-3, 0.01), nn.ReLU()),
               nn.Sequential(nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False), nn.BatchNorm2d(8)),
               ConvNormAct(8, 8, 5, groups=8, act_layer="silu")]
    for src in sources:
        with torch.no_grad():
            for mod in src.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_var.uniform_(0.5, 2)
                    mod.weight.uniform_(0.5, 1.5)
        m = DWConvBNAct.from_module(src)
        assert m[1].eps == [b for b in src.modules() if isinstance(b, nn.BatchNorm2d)][0].eps
        for train in (True, False):
            src.train(train)
            m.train(train)
            torch.testing.assert_close(m(x), src(x))


def test_from_module_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="depthwise"):
        DWConvBNAct.from_module(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8)))
    with pytest.raises(ValueError, match="without bias"):
        DWConvBNAct.from_module(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8)))
    with pytest.raises(ValueError, match="fuses SiLU, Hardswish, ReLU, ReLU6"):
        DWConvBNAct.from_module(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8), nn.GELU()))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        DWConvBNAct.from_module(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.GroupNorm(2, 8)))
    with pytest.raises(ValueError, match="activation must be one of"):
        DWConvBNAct(8, activation="gelu")


def test_eval_backward_with_frozen_batchnorm(backend, device):
    require_backend(OP, backend, device)
    ref = _reference(6, 3, 1, "hardswish").to(device).eval()
    fused = _fused_like(ref, backend, "hardswish").eval()
    for m in (ref, fused):
        m[1].requires_grad_(False)
    _compare(ref, fused, torch.randn(2, 6, 7, 8, device=device), train=False)
    assert fused[1].weight.grad is None
