"""Fused depthwise conv + BatchNorm + activation: the depthwise stage of MBConv / InvertedResidual.

    z = conv2d(x, weight, groups=C)            weight [C, 1, k, k], any stride / padding / dilation
    u = (z - mean) * invstd * bn_weight + bn_bias
    y = act(u)                                 act in none, relu, relu6, silu, hardswish

Training (batch statistics) runs two passes over x and saves only x, the weights and the per-channel
mean / invstd for backward (not z, not u):
  forward   1. z and per-channel partial (mean, M2) (Chan's parallel variance; no cancellation)
            2. recompute z, normalise, activate, write y
  backward  1. recompute z, u; reduce dbeta = sum g and dgamma = sum g * xhat, g = dy * act'(u)
            2. recompute z, u; dz = s * (g - dbeta / M - xhat * dgamma / M); dx = conv_transpose(dz),
               dweight = correlate(x, dz)
Eval (running statistics): BN is folded into a per-channel (scale, shift) applied to the conv output
in the kernel: one read of x and one write of y. Its backward (frozen-BN fine-tuning) gives grads
for x, weight and, through the fold, bn_weight / bn_bias.

Both are built from four kernels with one algebra, ``u = scale[c] * z + shift[c]`` (training:
scale = gamma * invstd, shift = beta - mean * scale; eval: the running-statistics fold):
``stats`` (per-channel mean and variance of z), ``forward`` (y), ``grad_stats`` (per-channel sums of
g and g * (z - center)), ``backward`` (dx and dweight for dz = scale * g + p[c] + q[c] * z). Triton
and the compiled extension (C++ on CPU, CUDA on GPU) implement the four; their reductions write
per-tile partials that a few tensor ops finish (:func:`_combine_stats`, ``sum(0)``; in C++ for the
extension, which keeps the per-call host work of small layers low). On CPU each training pass is one
C++ op that also does the per-channel algebra between the kernels. The ``torch`` backend is aten
conv + batch_norm + activation with aten's backward ops, recomputing z instead of saving it.

The kernels take square kernel sizes 3, 5 and 7; other sizes run on the torch backend (``auto``
falls back with one warning, an explicit kernel backend raises).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblocks import _ext
from fastblocks._backend import register_op, resolve
from fastblocks.ops._common import CustomOp, as_param, check_same, check_tensor, custom_op, is_channels_last, nchw_or_nhwc
from fastblocks.ops._triton import acc_type, activate, activate_grad, launches_on_input_device, tl, triton

register_op("dwconv_bn_act", "dwconv_affine_act_forward")

ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")  # index = code in csrc/activations.h
KERNEL_SIZES = (3, 5, 7)


# ---------------------------------------------------------------------------------------------
# Shapes and small per-channel algebra shared by every backend.
# ---------------------------------------------------------------------------------------------

def _output_hw(x: Tensor, k: int, stride, padding, dilation) -> tuple[int, int]:
    H, W = x.shape[2:]
    return ((H + 2 * padding[0] - dilation[0] * (k - 1) - 1) // stride[0] + 1,
            (W + 2 * padding[1] - dilation[1] * (k - 1) - 1) // stride[1] + 1)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _empty_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    Ho, Wo = _output_hw(x, weight.shape[-1], stride, padding, dilation)
    return torch.empty((x.shape[0], x.shape[1], Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _to_output_layout(grad: Tensor, x: Tensor) -> Tensor:
    return grad.contiguous(memory_format=_memory_format(x))


def _combine_stats(mean_p: Tensor, m2_p: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance from per-partition (mean, M2, count) (Chan et al.)."""
    total = count.sum()
    mean = (mean_p * count[:, None]).sum(0) / total
    m2 = m2_p.sum(0) + (count[:, None] * (mean_p - mean) ** 2).sum(0)
    return mean, m2 / total


def _train_affine(gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    scale = gamma * invstd
    return scale, beta - mean * scale


def _bn_backward_coefficients(scale, invstd, mean, sum_g, sum_gzc, count):
    """dz = scale * (g - dbeta / M - xhat * dgamma / M) written as scale * g + p + q * z."""
    dbeta, dgamma = sum_g, sum_gzc * invstd
    q = -scale * invstd * dgamma / count
    p = -scale * dbeta / count - q * mean
    return p, q, dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# The torch backend (reference): aten ops, recomputing the conv output in backward.
# ---------------------------------------------------------------------------------------------

def _torch_act_(u: Tensor, activation: str) -> Tensor:
    """act(u) in place (u is a fresh pre-activation): no second full-size tensor, as torchvision's
    inplace activations."""
    if activation == "none":
        return u
    return {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}[activation](u, inplace=True)


def _torch_act_backward(grad: Tensor, u: Tensor, activation: str) -> Tensor:
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(grad, u, 0)
    if activation == "relu6":
        return aten.hardtanh_backward(grad, u, 0.0, 6.0)
    if activation == "silu":
        return aten.silu_backward(grad, u)
    if activation == "hardswish":
        return aten.hardswish_backward(grad, u)
    return grad


def _torch_conv(x, weight, stride, padding, dilation) -> Tensor:
    return F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, x.shape[1])


def _torch_conv_backward(dz, x, weight, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    dx, dw, _ = torch.ops.aten.convolution_backward(dz, x, weight.to(x.dtype), None, stride, padding, dilation,
                                                    False, [0, 0], x.shape[1], [True, True, False])
    return dx.contiguous(memory_format=_memory_format(x)), dw.to(weight.dtype)


def _per_channel(t: Tensor) -> Tensor:
    return t[None, :, None, None]


def _torch_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * scale + shift per channel, one pass, in the parameters' dtype (a fresh tensor)."""
    return torch.addcmul(_per_channel(shift), x.to(scale.dtype), _per_channel(scale))


def _torch_affine_pre_activation(z: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _torch_affine(z, scale, shift).to(z.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels. A program owns a tile of BLOCK_P output pixels x BLOCK_C channels of one image:
# along W for NCHW (BLOCK_C small), along C for channels_last (BLOCK_C >= 32), so loads are
# coalesced in both layouts; tensors are indexed through their element strides. The K*K taps are
# unrolled and re-read from L1/L2. Math in fp32 (fp64 stays fp64). Reductions write one partial
# row per (image, pixel tile), finished on the host side by a small torch reduction.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile(C, Ho, Wo, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's image, partial-row index, output pixel coordinates and channels."""
    n = tl.program_id(2)
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = n * tl.num_programs(0) + tl.program_id(0)
    return n.to(tl.int64), part, ps // Wo, ps % Wo, cs, ps < Ho * Wo, cs < C


@triton.jit
def _tap(X, n, oh, ow, cs, pmask, cmask, kh, kw, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, ACC: tl.constexpr):
    """x at the (kh, kw) tap of each output pixel, zero in the padding."""
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    m = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = n * sxn + (ih * sxh + iw * sxw)[:, None] + cs[None, :].to(tl.int64) * sxc
    return tl.load(X + offs, mask=m[:, None] & cmask[None, :], other=0.0).to(ACC)


@triton.jit
def _conv_tile(X, Wt, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
               K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    z = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            w = tl.load(Wt + cs * (K * K) + kh * K + kw, mask=cmask, other=0.0)
            z += _tap(X, n, oh, ow, cs, pmask, cmask, kh, kw, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                      ACC) * w[None, :]
    return z


@triton.jit
def _stats_kernel(X, Wt, MEAN, M2, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                  K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reads x; writes the tile's per-channel mean and M2 of z (centred on the tile mean)."""
    n, part, oh, ow, cs, pmask, cmask = _tile(C, Ho, Wo, BLOCK_P, BLOCK_C)
    z = _conv_tile(X, Wt, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                   K, ACC, BLOCK_P, BLOCK_C)
    m = pmask[:, None] & cmask[None, :]
    mean = tl.sum(tl.where(m, z, 0.0), 0) / tl.sum(pmask.to(ACC), 0)
    d = tl.where(m, z - mean[None, :], 0.0)
    tl.store(MEAN + part * C + cs, mean, mask=cmask)
    tl.store(M2 + part * C + cs, tl.sum(d * d, 0), mask=cmask)


@triton.jit
def _forward_kernel(X, Wt, S, T, Y, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                    SH, SW, PH, PW, DH, DW, ACT: tl.constexpr,
                    K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reads x; writes y = act(scale * z + shift)."""
    n, part, oh, ow, cs, pmask, cmask = _tile(C, Ho, Wo, BLOCK_P, BLOCK_C)
    z = _conv_tile(X, Wt, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                   K, ACC, BLOCK_P, BLOCK_C)
    s = tl.load(S + cs, mask=cmask, other=0.0)
    t = tl.load(T + cs, mask=cmask, other=0.0)
    y = activate(z * s[None, :] + t[None, :], ACT)
    offs = n * syn + (oh * syh + ow * syw)[:, None] + cs[None, :].to(tl.int64) * syc
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _grad_tile(DY, X, Wt, S, T, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
               SH, SW, PH, PW, DH, DW, ACT: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """z, g = dy * act'(scale * z + shift), the output offsets and the tile mask."""
    z = _conv_tile(X, Wt, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                   K, ACC, BLOCK_P, BLOCK_C)
    s = tl.load(S + cs, mask=cmask, other=0.0)
    t = tl.load(T + cs, mask=cmask, other=0.0)
    offs = n * syn + (oh * syh + ow * syw)[:, None] + cs[None, :].to(tl.int64) * syc
    m = pmask[:, None] & cmask[None, :]
    dy = tl.load(DY + offs, mask=m, other=0.0).to(ACC)
    g = tl.where(m, dy * activate_grad(z * s[None, :] + t[None, :], ACT), 0.0)
    return z, g, s, offs, m


@triton.jit
def _grad_stats_kernel(DY, X, Wt, S, T, CENTER, SG, SGZ, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                       SH, SW, PH, PW, DH, DW, ACT: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reads dy and x; writes the tile's per-channel sums of g and g * (z - center)."""
    n, part, oh, ow, cs, pmask, cmask = _tile(C, Ho, Wo, BLOCK_P, BLOCK_C)
    z, g, s, offs, m = _grad_tile(DY, X, Wt, S, T, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw,
                                  syn, syc, syh, syw, SH, SW, PH, PW, DH, DW, ACT, K, ACC, BLOCK_P, BLOCK_C)
    center = tl.load(CENTER + cs, mask=cmask, other=0.0)
    tl.store(SG + part * C + cs, tl.sum(g, 0), mask=cmask)
    tl.store(SGZ + part * C + cs, tl.sum(g * (z - center[None, :]), 0), mask=cmask)


@triton.jit
def _dz_kernel(DY, X, Wt, S, T, P, Q, DZ, DWP, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
               SH, SW, PH, PW, DH, DW, ACT: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reads dy and x; writes dz = scale * g + p + q * z (dy's layout and dtype) and the tile's
    partial weight gradient sum(dz * x_tap) per channel and tap."""
    n, part, oh, ow, cs, pmask, cmask = _tile(C, Ho, Wo, BLOCK_P, BLOCK_C)
    z, g, s, offs, m = _grad_tile(DY, X, Wt, S, T, n, oh, ow, cs, pmask, cmask, H, W, sxn, sxc, sxh, sxw,
                                  syn, syc, syh, syw, SH, SW, PH, PW, DH, DW, ACT, K, ACC, BLOCK_P, BLOCK_C)
    p = tl.load(P + cs, mask=cmask, other=0.0)
    q = tl.load(Q + cs, mask=cmask, other=0.0)
    dz = tl.where(m, s[None, :] * g + p[None, :] + q[None, :] * z, 0.0)
    tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=m)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            xt = _tap(X, n, oh, ow, cs, pmask, cmask, kh, kw, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, ACC)
            tl.store(DWP + (part * C + cs) * (K * K) + kh * K + kw, tl.sum(dz * xt, 0), mask=cmask)


@triton.jit
def _dx_kernel(DZ, Wt, DX, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw, SH, SW, PH, PW, DH, DW,
               K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Reads dz; writes dx = conv_transpose(dz, w), gathered per input pixel (no atomics)."""
    n, part, ih, iw, cs, pmask, cmask = _tile(C, H, W, BLOCK_P, BLOCK_C)
    dx = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        th = ih + PH - kh * DH
        oh = tl.where(th >= 0, th, 0) // SH
        mh = (th >= 0) & (th % SH == 0) & (oh < Ho)
        for kw in tl.static_range(K):
            tw = iw + PW - kw * DW
            ow = tl.where(tw >= 0, tw, 0) // SW
            m = pmask & mh & (tw >= 0) & (tw % SW == 0) & (ow < Wo)
            offs = n * syn + (oh * syh + ow * syw)[:, None] + cs[None, :].to(tl.int64) * syc
            dz = tl.load(DZ + offs, mask=m[:, None] & cmask[None, :], other=0.0).to(ACC)
            w = tl.load(Wt + cs * (K * K) + kh * K + kw, mask=cmask, other=0.0)
            dx += dz * w[None, :]
    offs = n * sxn + (ih * sxh + iw * sxw)[:, None] + cs[None, :].to(tl.int64) * sxc
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def _triton_blocks(x: Tensor, pixels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): channel-contiguous tiles for channels_last, pixel-contiguous for NCHW."""
    if is_channels_last(x):
        return 16, min(32, triton.next_power_of_2(x.shape[1]))
    return min(128, triton.next_power_of_2(pixels)), 1


class _FourPasses:
    """The training passes composed from the four kernels, the per-channel algebra between them as
    tensor ops. ``geom`` = (stride, padding, dilation)."""

    def train_forward(self, x, w, gamma, beta, eps, geom, act):
        """(y, mean, invstd) with batch statistics."""
        mean, var = self.stats(x, w, geom)
        invstd = torch.rsqrt(var + eps)
        scale, shift = _train_affine(gamma, beta, mean, invstd)
        return self.forward(x, w, scale, shift, geom, act), mean, invstd

    def train_backward(self, grad, x, w, gamma, beta, mean, invstd, geom, act):
        """(dx, dw, dgamma, dbeta) of :meth:`train_forward`."""
        scale, shift = _train_affine(gamma, beta, mean, invstd)
        sum_g, sum_gzc = self.grad_stats(grad, x, w, scale, shift, mean, geom, act)
        count = grad.shape[0] * grad.shape[2] * grad.shape[3]
        p, q, dgamma, dbeta = _bn_backward_coefficients(scale, invstd, mean, sum_g, sum_gzc, count)
        return *self.backward(grad, x, w, scale, shift, p, q, geom, act), dgamma, dbeta


class _TritonKernels(_FourPasses):
    """The four passes as Triton launches."""

    @staticmethod
    @launches_on_input_device
    def _launch(x: Tensor, kernel, out: Tensor, tiled: Tensor, args, geom, **meta) -> None:
        """One program per (pixel tile of ``tiled``, channel tile, image)."""
        N, C, H, W = x.shape
        pixels = tiled.shape[2] * tiled.shape[3]
        if N * C * pixels == 0:
            return
        block_p, block_c = _triton_blocks(x, pixels)
        grid = (triton.cdiv(pixels, block_p), triton.cdiv(C, block_c), N)
        (sh, sw), (ph, pw), (dh, dw) = geom
        kernel[grid](*args, C, H, W, out.shape[2], out.shape[3], *x.stride(), *meta.pop("out_strides", ()),
                     sh, sw, ph, pw, dh, dw, **meta, ACC=acc_type(x), BLOCK_P=block_p, BLOCK_C=block_c)

    @staticmethod
    def _partial_rows(x: Tensor, out: Tensor) -> tuple[int, int]:
        """(rows of the partial buffers, pixels per full tile) for a reduction over ``out``."""
        pixels = out.shape[2] * out.shape[3]
        block_p = _triton_blocks(x, pixels)[0]
        return x.shape[0] * triton.cdiv(pixels, block_p), block_p

    def stats(self, x, w, geom):
        y = _empty_output(x, w, *geom)
        rows, block_p = self._partial_rows(x, y)
        mean, m2 = (x.new_empty((rows, x.shape[1]), dtype=w.dtype) for _ in range(2))
        self._launch(x, _stats_kernel, y, y, (x, w, mean, m2), geom, K=w.shape[-1])
        pixels = y.shape[2] * y.shape[3]
        tiles = rows // max(x.shape[0], 1)
        count = (pixels - torch.arange(tiles, device=x.device, dtype=w.dtype) * block_p).clamp(max=block_p)
        return _combine_stats(mean, m2, count.repeat(x.shape[0]))

    def forward(self, x, w, scale, shift, geom, act):
        y = _empty_output(x, w, *geom)
        self._launch(x, _forward_kernel, y, y, (x, w, scale, shift, y), geom, out_strides=y.stride(),
                     ACT=ACTIVATIONS.index(act), K=w.shape[-1])
        return y

    def grad_stats(self, grad, x, w, scale, shift, center, geom, act):
        rows, _ = self._partial_rows(x, grad)
        sum_g, sum_gz = (x.new_empty((rows, x.shape[1]), dtype=w.dtype) for _ in range(2))
        self._launch(x, _grad_stats_kernel, grad, grad, (grad, x, w, scale, shift, center, sum_g, sum_gz), geom,
                     out_strides=grad.stride(), ACT=ACTIVATIONS.index(act), K=w.shape[-1])
        return sum_g.sum(0), sum_gz.sum(0)

    def backward(self, grad, x, w, scale, shift, p, q, geom, act):
        K = w.shape[-1]
        rows, _ = self._partial_rows(x, grad)
        dz = torch.empty_like(grad)
        dw = x.new_empty((rows, x.shape[1], K, K), dtype=w.dtype)  # every row written: one per (image, pixel tile)
        self._launch(x, _dz_kernel, grad, grad, (grad, x, w, scale, shift, p, q, dz, dw), geom,
                     out_strides=grad.stride(), ACT=ACTIVATIONS.index(act), K=K)
        dx = torch.zeros_like(x) if grad.numel() == 0 else torch.empty_like(x)
        self._launch(x, _dx_kernel, grad, x, (dz, w, dx), geom, out_strides=dz.stride(), K=K)
        return dx, dw.sum(0).view_as(w)


class _ExtKernels(_FourPasses):
    """The four passes as fastblocks._C kernels (C++ on CPU tensors, CUDA on CUDA tensors)."""

    def stats(self, x, w, geom):
        return _ext.op("dwconv_bn_stats")(x, w, *geom)

    def forward(self, x, w, scale, shift, geom, act):
        return _ext.op("dwconv_affine_act_forward")(x, w, scale, shift, *geom, ACTIVATIONS.index(act))

    def grad_stats(self, grad, x, w, scale, shift, center, geom, act):
        return _ext.op("dwconv_affine_act_grad_stats")(grad, x, w, scale, shift, center, *geom, ACTIVATIONS.index(act))

    def backward(self, grad, x, w, scale, shift, p, q, geom, act):
        return _ext.op("dwconv_affine_act_backward")(grad, x, w, scale, shift, p, q, *geom, ACTIVATIONS.index(act))


class _CppKernels(_ExtKernels):
    """On CPU each training pass is one C++ op: the per-channel algebra runs as loops (a dozen tensor
    ops from Python cost more than the kernels of a small layer) and small NCHW planes are copied
    to channels_last once per pass, not once per kernel."""

    def train_forward(self, x, w, gamma, beta, eps, geom, act):
        return _ext.op("dwconv_bn_act_train_forward")(x, w, gamma, beta, eps, *geom, ACTIVATIONS.index(act))

    def train_backward(self, grad, x, w, gamma, beta, mean, invstd, geom, act):
        return _ext.op("dwconv_bn_act_train_backward")(grad, x, w, gamma, beta, mean, invstd, *geom,
                                                       ACTIVATIONS.index(act))


_KERNELS = {"triton": _TritonKernels(), "cpp": _CppKernels(), "cuda": _ExtKernels()}


# ---------------------------------------------------------------------------------------------
# Registered ops. Parameters arrive as contiguous tensors in the accumulation dtype (fp32, fp64
# for fp64 x); mean / invstd come back in that dtype. ``impl`` is a resolved backend name.
# ---------------------------------------------------------------------------------------------

@custom_op("fastblocks::dwconv_bn_act_train")
def _train_op(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float, stride: list[int],
              padding: list[int], dilation: list[int], activation: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    x = nchw_or_nhwc(x)
    geom = (stride, padding, dilation)
    if impl == "torch":
        z = _torch_conv(x, weight, *geom)
        u, mean, invstd = torch.ops.aten.native_batch_norm(z, bn_weight, bn_bias, None, None, True, 0.0, eps)
        y = _torch_act_(u, activation).contiguous(memory_format=_memory_format(x))
        return y, mean.to(weight.dtype), invstd.to(weight.dtype)
    return _KERNELS[impl].train_forward(x, weight, bn_weight, bn_bias, eps, geom, activation)


@custom_op("fastblocks::dwconv_bn_act_train_backward")
def _train_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor,
                       invstd: Tensor, stride: list[int], padding: list[int], dilation: list[int], activation: str,
                       impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = nchw_or_nhwc(x)
    grad = _to_output_layout(grad, x)
    geom = (stride, padding, dilation)
    if impl == "torch":
        scale, shift = _train_affine(bn_weight, bn_bias, mean, invstd)
        z = _torch_conv(x, weight, *geom)
        g = _torch_act_backward(grad, _torch_affine_pre_activation(z, scale, shift), activation)
        dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(g, z, bn_weight, None, None, mean, invstd,
                                                                      True, 0.0, [True, True, True])
        return *_torch_conv_backward(dz, x, weight, *geom), dgamma, dbeta
    return _KERNELS[impl].train_backward(grad, x, weight, bn_weight, bn_bias, mean, invstd, geom, activation)


@_train_op.register_fake
def _(x, weight, bn_weight, bn_bias, eps, stride, padding, dilation, activation, impl):
    y = _empty_output(nchw_or_nhwc(x), weight, stride, padding, dilation)
    return y, torch.empty_like(bn_weight), torch.empty_like(bn_weight)


@_train_backward_op.register_fake
def _(grad, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation, activation, impl):
    return (torch.empty_like(nchw_or_nhwc(x)), torch.empty_like(weight), torch.empty_like(bn_weight),
            torch.empty_like(bn_weight))


def _train_setup(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, _, *ctx.args = inputs  # args: stride, padding, dilation, activation, impl
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, invstd)


def _train_grad(ctx, grad, _grad_mean, _grad_invstd):
    grads = _train_backward_op(grad, *ctx.saved_tensors, *ctx.args)
    return *grads, None, None, None, None, None, None


_train_op.register_autograd(_train_grad, setup_context=_train_setup)


def _affine_forward(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: list[int], padding: list[int],
                    dilation: list[int], activation: str, impl: str) -> Tensor:
    x = nchw_or_nhwc(x)
    geom = (stride, padding, dilation)
    if impl == "torch":
        z = _torch_conv(x, weight, *geom)
        y = _torch_act_(_torch_affine_pre_activation(z, scale, shift), activation)
        return y.contiguous(memory_format=_memory_format(x))
    return _KERNELS[impl].forward(x, weight, scale, shift, geom, activation)


_affine_op = CustomOp("fastblocks::dwconv_affine_act", _affine_forward)


@custom_op("fastblocks::dwconv_affine_act_backward")
def _affine_backward_op(grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: list[int],
                        padding: list[int], dilation: list[int], activation: str, affine_grad: bool,
                        impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for x, weight, scale and shift (the last two zero unless ``affine_grad``)."""
    x = nchw_or_nhwc(x)
    grad = _to_output_layout(grad, x)
    geom = (stride, padding, dilation)
    zero = torch.zeros_like(scale)
    if impl == "torch":
        z = _torch_conv(x, weight, *geom)
        g = _torch_act_backward(grad, _torch_affine_pre_activation(z, scale, shift), activation).to(scale.dtype)
        dscale, dshift = ((g * z).sum((0, 2, 3)), g.sum((0, 2, 3))) if affine_grad else (zero, zero.clone())
        return *_torch_conv_backward((g * _per_channel(scale)).to(x.dtype), x, weight, *geom), dscale, dshift
    kernels = _KERNELS[impl]
    dscale, dshift = zero, zero.clone()  # distinct outputs: a custom op may not return aliases
    if affine_grad:
        dshift, dscale = kernels.grad_stats(grad, x, weight, scale, shift, zero, geom, activation)
    return *kernels.backward(grad, x, weight, scale, shift, zero, zero, geom, activation), dscale, dshift


@_affine_op.register_fake
def _(x, weight, scale, shift, stride, padding, dilation, activation, impl):
    return _empty_output(nchw_or_nhwc(x), weight, stride, padding, dilation)


@_affine_backward_op.register_fake
def _(grad, x, weight, scale, shift, stride, padding, dilation, activation, affine_grad, impl):
    return torch.empty_like(nchw_or_nhwc(x)), torch.empty_like(weight), torch.empty_like(scale), torch.empty_like(shift)


def _affine_setup(ctx, inputs, output):
    x, weight, scale, shift, *ctx.args = inputs  # args: stride, padding, dilation, activation, impl
    ctx.save_for_backward(x, weight, scale, shift)


def _affine_grad(ctx, grad):
    affine_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    *geom_act, impl = ctx.args
    grads = _affine_backward_op(grad, *ctx.saved_tensors, *geom_act, affine_grad, impl)
    return *grads, None, None, None, None, None


_affine_op.register_autograd(_affine_grad, setup_context=_affine_setup)


# ---------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------

def _pair(v, name: str) -> list[int]:
    pair = [v, v] if isinstance(v, int) else list(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def _unsupported(weight: Tensor):
    def reason(backend: str) -> str | None:
        k = tuple(weight.shape[-2:])
        if backend != "torch" and (k[0] != k[1] or k[0] not in KERNEL_SIZES):
            return f"the {backend} kernels take square kernel sizes {KERNEL_SIZES}, got {k[0]}x{k[1]}"
        return None
    return reason


def _check_inputs(x, weight, params: dict, activation: str):
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight")
    check_same(weight, "weight", x, "x")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight must be a depthwise filter of shape [C, 1, kH, kW] with C = {C}, "
                         f"got {tuple(weight.shape)}")
    for name, t in params.items():
        if t is None:
            continue
        check_tensor(t, name)
        if t.shape != (C,):
            raise ValueError(f"{name} must have shape [C] = [{C}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def dwconv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                  momentum: float = 0.1, eps: float = 1e-5, stride=1, padding=None, dilation=1,
                  activation: str | None = "silu", impl: str | None = "auto") -> Tensor:
    """``act(F.batch_norm(F.conv2d(x, weight, groups=C), ...))`` in one fused op.

    The BatchNorm arguments mean what they mean in ``F.batch_norm``: with ``training`` (or without
    running statistics) it normalises with the batch statistics and, if running statistics are
    given, updates them in place with factor ``momentum`` (unbiased variance); otherwise it uses the
    running statistics, folded into the kernel. ``padding=None`` means ``dilation * (k - 1) // 2``
    ("same" for odd k). ``activation``: "silu", "hardswish", "relu", "relu6" or None / "none".
    """
    y, stats = _dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride,
                              padding, dilation, activation, impl)
    if stats is not None and running_mean is not None and running_var is not None:
        mean, var, count = stats
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (count / max(count - 1, 1))).to(running_var.dtype), momentum)
    return y


def _dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats: bool, eps, stride,
                   padding, dilation, activation, impl) -> tuple[Tensor, tuple[Tensor, Tensor, int] | None]:
    """The op behind :func:`dwconv_bn_act` and ``nn.DWConvBNAct``: returns y and, when normalising
    with batch statistics, (mean, biased var, values per channel) for the running-statistics update."""
    activation = "none" if activation is None else activation
    _check_inputs(x, weight, {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean,
                              "running_var": running_var}, activation)
    k = weight.shape[-2:]
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    padding = [d * (s - 1) // 2 for d, s in zip(dilation, k)] if padding is None else _pair(padding, "padding")
    backend = resolve("dwconv_bn_act", impl, x, unsupported=_unsupported(weight))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[1]

    def param(t, default):
        return torch.full((C,), default, dtype=acc, device=x.device) if t is None else as_param(t, acc)

    gamma, beta, w = param(bn_weight, 1.0), param(bn_bias, 0.0), as_param(weight, acc)
    geom = (stride, padding, dilation)
    if batch_stats or running_mean is None or running_var is None:
        Ho, Wo = _output_hw(x, k[0], stride, padding, dilation)
        count = x.shape[0] * Ho * Wo
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        y, mean, invstd = _train_op(x, w, gamma, beta, eps, *geom, activation, backend)
        return y, (mean, invstd ** -2 - eps, count)
    scale = gamma * torch.rsqrt(running_var.to(acc) + eps)
    shift = beta - running_mean.to(acc) * scale
    return _affine_op(x, w, scale, shift, *geom, activation, backend), None
