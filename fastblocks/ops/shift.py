"""The shift operation of Wu et al., "Shift: A Zero FLOP, Zero Parameter Alternative to Spatial
Convolutions" (CVPR 2018): every channel is moved by one spatial offset, with zero fill.

Channel assignment. With ``k = kernel_size`` the C channels are split into k² contiguous groups of
``G = C // k²`` channels; group ``t`` (channels ``[t*G, (t+1)*G)``) gets the tap ``t`` of a k×k kernel
in row-major order, i.e. the offset ::

    (dy, dx) = ((t // k) - k // 2, (t % k) - k // 2) * dilation

The centre tap ``t = k² // 2`` has offset (0, 0). The ``C - k²·G`` leftover channels (at the end) are
not moved either, so with ``C < k²`` the op is the identity. For k = 3 (dilation 1)::

    group t   0        1       2       3       4 + leftover   5       6       7       8
    (dy, dx)  (-1,-1)  (-1,0)  (-1,1)  (0,-1)  (0,0)          (0,1)   (1,-1)  (1,0)   (1,1)

Sign convention: the output reads the input at the offset, like a depthwise convolution whose k×k
kernel is one-hot at tap ``t`` (padding ``dilation * (k // 2)``)::

    out[n, c, i, j] = x[n, c, i*stride + dy, j*stride + dx]     (0 outside x)

so the content of group t moves by (-dy, -dx): group 5 (dx = +1) moves the image one pixel left.
Output size is ``ceil(H / stride) x ceil(W / stride)``; a stride > 1 samples the shifted image in the
same pass (no full-size intermediate).

The official ShiftResNet code assigns taps round-robin (``t = c % k²``) instead of in contiguous
groups; the two differ by a channel permutation that the following 1×1 convolution absorbs.
Contiguous groups let channels_last kernels copy whole groups at once.

Backward is the adjoint: ``dx[n, c, y, x] = dout[n, c, (y - dy) / stride, (x - dx) / stride]`` where
stride divides both and the index exists, else 0: the opposite shift, scattered back through the
stride, computed as a gather so that every element is written once. Nothing is saved for backward.

Layouts (the output keeps the input's memory format):
- NCHW: a row along W is contiguous; each (n, c, i) output row copies one input row with a column
  offset (C++: memcpy of the valid span + zero borders; CUDA: a thread per run of 16 bytes of the
  output row, 16-byte stores; Triton: tiles of rows x columns).
- channels_last: a pixel's C channels are contiguous and each tap group is a contiguous run of G
  channels read from one source pixel (C++: one memcpy per group and pixel; CUDA: a thread per 16
  bytes of a pixel's channels, 16-byte stores; Triton: tiles of pixels x channels).
Every backend is pure data movement, one read and one write per element, and bit-exact in every
dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblocks import _ext
from fastblocks._backend import register_op, resolve
from fastblocks.ops._common import CustomOp, check_tensor, custom_op, is_channels_last, nchw_or_nhwc
from fastblocks.ops._triton import launches_on_input_device, tl, triton

register_op("shift", "shift_forward")


def shift_groups(channels: int, kernel_size: int = 3, dilation: int = 1) -> list[tuple[int, int, int, int]]:
    """``(first channel, end channel, dy, dx)`` of every channel group, in channel order."""
    k, kk = kernel_size, kernel_size * kernel_size
    g = channels // kk
    groups = []
    for t in range(kk if g else 0):
        groups.append((t * g, (t + 1) * g, (t // k - k // 2) * dilation, (t % k - k // 2) * dilation))
    if g == 0 or kk * g < channels:  # leftovers join the centre group (all channels when C < k²)
        groups.append((kk * g, channels, 0, 0))
    return groups


def output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the `torch` backend, the test oracle and the bench's eager / compile
# baseline (autograd differentiates it through the pad and slices).
# ---------------------------------------------------------------------------------------------

def shift_reference(x: Tensor, kernel_size: int = 3, dilation: int = 1, stride: int = 1) -> Tensor:
    """Pad once, slice every group at its offset, concatenate along channels."""
    p = dilation * (kernel_size // 2)
    H, W = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p))
    return torch.cat([xp[:, c0:c1, p + dy:p + dy + H:stride, p + dx:p + dx + W:stride]
                      for c0, c1, dy, dx in shift_groups(x.shape[1], kernel_size, dilation)], dim=1)


def shift_adjoint_reference(grad: Tensor, kernel_size: int, dilation: int, stride: int, height: int,
                            width: int) -> Tensor:
    """The adjoint of ``shift_reference``: each group's gradient written back at its offset."""
    p = dilation * (kernel_size // 2)
    N, C = grad.shape[:2]
    out = grad.new_zeros(N, C, height + 2 * p, width + 2 * p)
    for c0, c1, dy, dx in shift_groups(C, kernel_size, dilation):
        out[:, c0:c1, p + dy:p + dy + height:stride, p + dx:p + dx + width:stride] = grad[:, c0:c1]
    return out[:, :, p:p + height, p:p + width]


# ---------------------------------------------------------------------------------------------
# Triton kernel: one kernel for the forward and the adjoint. Along each spatial axis output index
# o reads source index (o * MUL + SIGN * offset) / DIV: forward MUL = stride, DIV = 1, SIGN = 1;
# adjoint MUL = 1, DIV = stride, SIGN = -1. Pure data movement, so no accumulation dtype. Row,
# pixel and channel indices are int32 (the host checks they fit) and MUL / DIV / SIGN constexprs,
# so the per-element index math is 32-bit multiplies and shifts; only the final element offsets
# are int64. (With int64 rows and a runtime DIV the sm_90 build of this copy kernel needed
# 160-255 registers per thread; now <= 82, see tests/sm90_compile.py.)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tap_offsets(c, G, K, DIL, SIGN: tl.constexpr):
    """(dy, dx) of channels ``c``: group c // G; leftovers (c >= K²G, or G == 0) are not moved."""
    tap = tl.where(c < K * K * G, c // tl.maximum(G, 1), (K * K) // 2)
    return (tap // K - K // 2) * DIL * SIGN, (tap % K - K // 2) * DIL * SIGN


@triton.jit
def _source(o, off, n_in, MUL: tl.constexpr, DIV: tl.constexpr):
    """Source index along one axis for output index ``o``, and whether it exists."""
    t = o * MUL + off
    ok = (t >= 0) & (t < n_in * DIV) & (t % DIV == 0)
    return t // DIV, ok


@triton.jit
def _shift_kernel(X, Y, ROWS, C, H_IN, W_IN, H_OUT, W_OUT, G, K, DIL, SIGN: tl.constexpr, MUL: tl.constexpr,
                  DIV: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if CHANNELS_LAST:  # rows are output pixels (n, i, j), q the channels
        j = r % W_OUT
        i = (r // W_OUT) % H_OUT
        n = r // (W_OUT * H_OUT)
        dy, dx = _tap_offsets(q, G, K, DIL, SIGN)
        sy, ok_y = _source(i[:, None], dy[None, :], H_IN, MUL, DIV)
        sx, ok_x = _source(j[:, None], dx[None, :], W_IN, MUL, DIV)
        src = ((n[:, None].to(tl.int64) * H_IN + sy) * W_IN + sx) * C + q[None, :]
        dst = r[:, None].to(tl.int64) * C + q[None, :]
        mask = (r < ROWS)[:, None] & (q < C)[None, :]
    else:  # rows are (n, c, i), q the output columns j
        i = r % H_OUT
        nc = r // H_OUT
        dy, dx = _tap_offsets(nc % C, G, K, DIL, SIGN)
        sy, ok_y = _source(i, dy, H_IN, MUL, DIV)
        sx, ok_x = _source(q[None, :], dx[:, None], W_IN, MUL, DIV)
        src = ((nc.to(tl.int64) * H_IN + sy) * W_IN)[:, None] + sx
        dst = (r.to(tl.int64) * W_OUT)[:, None] + q[None, :]
        mask = (r < ROWS)[:, None] & (q < W_OUT)[None, :]
        ok_y = ok_y[:, None]
    v = tl.load(X + src, mask=mask & ok_y & ok_x, other=0.0)
    tl.store(Y + dst, v, mask=mask)


@launches_on_input_device
def _triton_shift(x: Tensor, out: Tensor, kernel_size: int, dilation: int, sign: int, mul: int,
                  div: int) -> Tensor:
    if out.numel() == 0:
        return out
    N, C, H_in, W_in = x.shape
    H_out, W_out = out.shape[2:]
    channels_last = is_channels_last(x)  # not out's: a 1x1 output is both layouts at once
    rows, q = (N * H_out * W_out, C) if channels_last else (N * C * H_out, W_out)
    if rows + 2048 > 2**31 or N * H_in * W_in > 2**31:
        raise ValueError(f"the Triton shift kernel indexes rows and pixels in int32; x {tuple(x.shape)} is too "
                         "large for it (use impl='cuda')")
    block_q = min(128, triton.next_power_of_2(q))
    block_r = max(1, 2048 // block_q)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(q, block_q))
    _shift_kernel[grid](x, out, rows, C, H_in, W_in, H_out, W_out, C // kernel_size**2, kernel_size, dilation,
                        SIGN=sign, MUL=mul, DIV=div, CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_Q=block_q)
    return out


# ---------------------------------------------------------------------------------------------
# Registered ops: torch.ops.fastblocks.shift / shift_backward with fake kernels and autograd. `impl`
# is a resolved backend name; cpp and cuda are the same extension op, dispatched on device.
# ---------------------------------------------------------------------------------------------

def _empty_out(x: Tensor, height: int, width: int) -> Tensor:
    """The output buffer: x's batch and channels, the given spatial size, x's memory format."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], height, width), dtype=x.dtype, device=x.device, memory_format=fmt)


def _shift_forward(x: Tensor, kernel_size: int, dilation: int, stride: int, impl: str) -> Tensor:
    x = nchw_or_nhwc(x)
    H, W = x.shape[2:]
    if impl == "torch":
        out = _empty_out(x, output_size(H, stride), output_size(W, stride))
        return out.copy_(shift_reference(x, kernel_size, dilation, stride))
    if impl == "triton":
        out = _empty_out(x, output_size(H, stride), output_size(W, stride))
        return _triton_shift(x, out, kernel_size, dilation, sign=1, mul=stride, div=1)
    return _ext.op("shift_forward")(x, kernel_size, dilation, stride)


_shift_op = CustomOp("fastblocks::shift", _shift_forward)


@custom_op("fastblocks::shift_backward")
def _shift_backward_op(grad: Tensor, kernel_size: int, dilation: int, stride: int, height: int, width: int,
                       impl: str) -> Tensor:
    grad = nchw_or_nhwc(grad)
    if impl == "torch":
        out = _empty_out(grad, height, width)
        return out.copy_(shift_adjoint_reference(grad, kernel_size, dilation, stride, height, width))
    if impl == "triton":
        return _triton_shift(grad, _empty_out(grad, height, width), kernel_size, dilation, sign=-1, mul=1, div=stride)
    return _ext.op("shift_backward")(grad, kernel_size, dilation, stride, height, width)


@_shift_op.register_fake
def _(x, kernel_size, dilation, stride, impl):
    x = nchw_or_nhwc(x)
    return _empty_out(x, output_size(x.shape[2], stride), output_size(x.shape[3], stride))


@_shift_backward_op.register_fake
def _(grad, kernel_size, dilation, stride, height, width, impl):
    return _empty_out(nchw_or_nhwc(grad), height, width)


def _shift_setup(ctx, inputs, output):
    x, ctx.kernel_size, ctx.dilation, ctx.stride, ctx.impl = inputs
    ctx.height, ctx.width = x.shape[2:]


def _shift_grad(ctx, grad):
    dx = _shift_backward_op(grad, ctx.kernel_size, ctx.dilation, ctx.stride, ctx.height, ctx.width, ctx.impl)
    return dx, None, None, None, None


def _shift_backward_setup(ctx, inputs, output):
    _, ctx.kernel_size, ctx.dilation, ctx.stride, _, _, ctx.impl = inputs


def _shift_backward_grad(ctx, grad):  # the adjoint of the adjoint is the shift (double backward)
    return _shift_op(grad, ctx.kernel_size, ctx.dilation, ctx.stride, ctx.impl), *[None] * 6


_shift_op.register_autograd(_shift_grad, setup_context=_shift_setup)
_shift_backward_op.register_autograd(_shift_backward_grad, setup_context=_shift_backward_setup)


# ---------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------

def _check_int(value, name: str, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1 or (odd and value % 2 == 0):
        raise ValueError(f"{name} must be {'an odd integer' if odd else 'an integer'} >= 1, got {value}")


def shift(x: Tensor, kernel_size: int = 3, dilation: int = 1, stride: int = 1, impl: str | None = "auto") -> Tensor:
    """Shift each channel group of ``x`` [N, C, H, W] by its offset (see the module docstring).

    ``out[n, c, i, j] = x[n, c, i*stride + dy, j*stride + dx]`` (0 outside), with ``(dy, dx)`` the
    tap of group ``c // (C // kernel_size²)`` of a ``kernel_size`` x ``kernel_size`` kernel, times
    ``dilation``; leftover channels are not moved. The output has size ``ceil(H / stride)`` x
    ``ceil(W / stride)`` and ``x``'s memory format. ``impl`` picks the backend.
    """
    check_tensor(x, "x", ndim=4)
    _check_int(kernel_size, "kernel_size", odd=True)
    _check_int(dilation, "dilation")
    _check_int(stride, "stride")
    return _shift_op(x, kernel_size, dilation, stride, resolve("shift", impl, x))
