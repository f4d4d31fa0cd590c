"""The convolutions under `layers.Conv`, channels-last, computed by the algorithm a static field chooses.

`conv_apply` is an N-d convolution with per-axis zero or replicate padding, `upsample_conv_apply` the same after a
nearest 2x upsampling in H and W. Inputs `[B, *spatial, C_in]`, kernels `[*k, C_in, C_out]`. `impl` (a
`conv_impl.ConvImpl` or its name, `auto` resolved for `jax.default_backend()` when traced) chooses how a 3D
convolution with more than one time tap is computed: `lax.conv_general_dilated` in 3D (`xla`, TPU and GPU) or the
CPU forms of `cpu_conv.py`, which also tie derived kernels to their layer's input. Every impl computes a 3D
convolution of a one-frame input (images through the video model) as one 2D convolution (`_one_frame_taps`). The
upsampling is either the upsampled copy then the convolution (`xla`) or sub-pixel (`subpixel`, without the copy).
Convolutions accumulate in float32 whatever the compute dtype.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cvvae_jax.models import cpu_conv
from cvvae_jax.models.conv_impl import ConvImpl, Pad, UpsampleImpl, resolve_conv_impl, resolve_upsample_impl

Dtype = Any
Array = jax.Array

__all__ = ["ConvImpl", "Pad", "UpsampleImpl", "conv_apply", "upsample_conv_apply"]

# The CPU forms of a 3D convolution with several time taps.
_CPU_CONV3D = {ConvImpl.CPU: cpu_conv.conv3d_cpu, ConvImpl.CPU_TAPS: cpu_conv.conv3d_taps,
              ConvImpl.CPU_FRAMES: cpu_conv.conv3d_looped}


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
  spatial = "DHW"[-rank:] if rank <= 3 else None
  if spatial is None:
    raise ValueError(f"only 1D-3D convolutions are supported, got rank {rank}")
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def conv_apply(x: Array, kernel: Array, bias: Array, *, strides: tuple[int, ...] | None = None,
               padding: tuple[tuple[int, int, Pad], ...] | None = None, dtype: Dtype = jnp.float32,
               precision: Any = None, impl: str | ConvImpl = "auto") -> Array:
  """The function `Conv` computes: `x [B, *spatial, C_in]`, `kernel [*k, C_in, C_out]` -> `[B, *spatial', C_out]`."""
  return (_conv_float32(x, kernel, strides=strides, padding=padding, dtype=dtype, precision=precision,
                        impl=resolve_conv_impl(impl)) + bias).astype(dtype)


def _conv_float32(x: Array, kernel: Array, *, strides: tuple[int, ...] | None, padding, dtype: Dtype,
                  precision: Any, impl: ConvImpl) -> Array:
  """`conv_apply` without the bias, in `dtype` with the float32 accumulator returned (not rounded to `dtype`)."""
  rank = kernel.ndim - 2
  padding = tuple(padding or ((0, 0, Pad.ZEROS),) * rank)
  strides = strides or (1,) * rank
  cpu_form = impl is not ConvImpl.XLA
  time_taps = rank == 3 and kernel.shape[0] > 1
  taps = _one_frame_taps(kernel.shape[0], padding[0], strides[0]) if time_taps and x.shape[1] == 1 else ()
  if taps:  # one input frame (images through the video model): one 2D convolution with the taps that read it merged
    kernel = cpu_conv.tie_kernel(x, kernel) if cpu_form else kernel
    merged = functools.reduce(lax.add, [kernel[k].astype(jnp.float32) for k in taps]).astype(kernel.dtype)
    return _conv_float32(x[:, 0], merged, strides=strides[1:], padding=padding[1:], dtype=dtype,
                         precision=precision, impl=impl)[:, None]
  if cpu_form and (time_taps or kernel.dtype != dtype):  # kernel taps or a cast: derived per call
    kernel = cpu_conv.tie_kernel(x, kernel)
  if cpu_form and time_taps:
    time_pad, padding = padding[0], padding[1:]  # time padding: inside the CPU form
  # Replicate padding is explicit; zero padding is folded into the convolution.
  edge = [(0, 0)] * (x.ndim - 1 - len(padding)) + [(lo, hi) if mode is Pad.REPLICATE else (0, 0)
                                                   for lo, hi, mode in padding] + [(0, 0)]
  if any(lo or hi for lo, hi in edge):
    x = jnp.pad(x, edge, mode="edge")
  conv_pad = [(lo, hi) if mode is Pad.ZEROS else (0, 0) for lo, hi, mode in padding]
  if cpu_form and time_taps:
    return _CPU_CONV3D[impl](x.astype(dtype), kernel.astype(dtype), tuple(strides), tuple(time_pad),
                            tuple(conv_pad), precision)
  conv = functools.partial(_conv_low_precision_backward if dtype != jnp.float32 else _conv, tuple(strides),
                           tuple(map(tuple, conv_pad)), _dimension_numbers(rank), precision)
  return conv(x.astype(dtype), kernel.astype(dtype))  # accumulates in float32 also for bf16 compute


def _one_frame_taps(kt: int, time_pad: tuple[int, int, Pad], stride: int) -> tuple[int, ...]:
  """The time taps that read the frame of a one-frame input, when the padded frame gives exactly one output frame
  (else `()`): every tap with replicate padding (the padding frames are copies of it), the tap over it with zeros.

  Output frame 0 reads padded frames 0 .. kt - 1, of which the input frame is number `before`; the others are
  padding. So the 3D convolution of a `[B, 1, H, W, C]` input is the 2D convolution of its frame with those taps of
  the kernel summed: the same result up to float summation order, without the padded copy and at 1/kt of the
  multiply-adds where every tap reads it (the causal convolutions of the CV-VAE on its image stream)."""
  before, after, mode = time_pad
  if (1 + before + after - kt) // stride + 1 != 1:
    return ()
  if mode is Pad.REPLICATE:
    return tuple(range(kt))
  return (before,) if before < kt else ()  # (zeros: no tap over the frame, an all-bias output: not merged)


def _conv(strides, padding, dimension_numbers, precision, x: Array, kernel: Array) -> Array:
  """`lax.conv_general_dilated` with a float32 result."""
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=dimension_numbers, precision=precision,
                                  preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv_low_precision_backward(strides, padding, dimension_numbers, precision, x: Array, kernel: Array) -> Array:
  """`_conv` of low-precision (bf16) `x` and `kernel` whose backward convolutions also run in that precision.

  JAX differentiates a float32-result convolution of bf16 operands in float32: it upcasts the incoming cotangent's
  partner operands, so the backward holds float32 copies of the layer's input and of the cotangent. Here the
  cotangent is rounded to `x.dtype` first; that is exact whenever the float32 result is only rounded to `x.dtype`
  (`conv_apply`: bias, then the cast), so the input gradient is the same, and the kernel gradient is accumulated
  in float32 and rounded once to `x.dtype`.
  """
  return _conv(strides, padding, dimension_numbers, precision, x, kernel)


def _conv_lp_fwd(strides, padding, dimension_numbers, precision, x, kernel):
  return _conv(strides, padding, dimension_numbers, precision, x, kernel), (x, kernel)


def _conv_lp_bwd(strides, padding, dimension_numbers, precision, res, g):
  x, kernel = res
  low = lambda a, k: lax.conv_general_dilated(a, k, window_strides=strides, padding=padding,
                                              dimension_numbers=dimension_numbers, precision=precision,
                                              preferred_element_type=x.dtype)
  return jax.vjp(low, x, kernel)[1](g.astype(x.dtype))


_conv_low_precision_backward.defvjp(_conv_lp_fwd, _conv_lp_bwd)


# Nearest-2x upsampling followed by a 3-tap convolution, per output phase p (row 2i + p): phase 0 reads input rows
# (i - 1, i, i) with taps (0, 1, 2), i.e. taps {0} and {1, 2} on rows (i - 1, i); phase 1 reads (i, i, i + 1), i.e.
# taps {0, 1} and {2} on rows (i, i + 1). `_PHASE_TAPS[p, a, k]` is 1 where tap k merges into 2-tap position a.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def _phase_kernel(kernel: Array, dy: int, dx: int) -> Array:
  """The 2x2 kernel `[*ks, 2, 2, C, O]` of output phase (dy, dx) from a 3x3 one `[*ks, 3, 3, C, O]` (`_PHASE_TAPS`).

  Each merged tap is a sum of 1-4 kernel slices; XLA fuses the sums and their concatenation into one pass that writes
  just the merged kernel (an einsum with the 0/1 tap matrices is a dot plus a transposed copy).
  """
  rows, cols = kernel.ndim - 4, kernel.ndim - 3
  def merged(a: int, b: int) -> Array:
    return functools.reduce(lax.add, [
        lax.index_in_dim(lax.index_in_dim(kernel, i, rows), j, cols)
        for i, row_used in enumerate(_PHASE_TAPS[dy][a]) if row_used
        for j, col_used in enumerate(_PHASE_TAPS[dx][b]) if col_used])
  return jnp.concatenate([jnp.concatenate([merged(a, b) for b in (0, 1)], cols) for a in (0, 1)], rows)


def upsample_conv_apply(x: Array, kernel: Array, bias: Array, *,
                        padding: tuple[tuple[int, int, Pad], ...] | None = None, dtype: Dtype = jnp.float32,
                        precision: Any = None, impl: str | UpsampleImpl = "auto",
                        conv_impl: str | ConvImpl = "auto") -> Array:
  """`conv_apply(nearest_upsample_2x(x), kernel, bias, padding=padding)`, computed as `impl` chooses.

  `x [B, *s, H, W, C]`, `kernel [*ks, 3, 3, C, O]` (`*s`/`*ks`: an optional leading time axis, not upsampled),
  `padding` per spatial axis with `(1, 1, mode)` on H and W, one mode for both (time: anything `conv_apply` takes)
  -> `[B, *s', 2H, 2W, O]`. `impl` "xla": the upsampled copy, then `conv_apply`; "subpixel": `_subpixel` (the
  same result up to float summation order, without the copy); "auto": `resolve_upsample_impl`. `conv_impl`: the
  algorithm of the convolution(s), as in `conv_apply`.
  """
  rank = kernel.ndim - 2
  if kernel.shape[-4:-2] != (3, 3):
    raise ValueError(f"upsample_conv_apply: expected a 3x3 spatial kernel, got kernel shape {kernel.shape}")
  padding = tuple(padding or ((0, 0, Pad.ZEROS),) * rank)
  modes = {mode for _, _, mode in padding[-2:]}
  if any((lo, hi) != (1, 1) for lo, hi, _ in padding[-2:]) or len(modes) != 1:
    raise ValueError(f"upsample_conv_apply: expected padding (1, 1, mode) in H and W, one mode, got {padding}")
  conv_impl = resolve_conv_impl(conv_impl)
  if resolve_upsample_impl(impl) is UpsampleImpl.XLA:
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return conv_apply(x, kernel, bias, padding=padding, dtype=dtype, precision=precision, impl=conv_impl)
  return _subpixel(x, kernel, bias, padding, modes.pop(), dtype, precision, conv_impl)


def _subpixel(x: Array, kernel: Array, bias: Array, padding, mode: Pad, dtype: Dtype, precision: Any,
              conv_impl: ConvImpl) -> Array:
  """The nearest-2x upsampling convolution without the upsampled copy ("sub-pixel"), `upsample_conv_apply`'s args.

  Output phase (dy, dx) (pixels `(2i + dy, 2j + dx)`) is a 2x2 convolution of the low-resolution input with the
  3x3 taps merged (`_PHASE_TAPS`), reading input rows `(i - 1, i)` for dy = 0 and `(i, i + 1)` for dy = 1 (columns
  likewise): 16/36 of the multiply-adds, and no 4x copy. The four phase outputs are interleaved (depth-to-space).
  Zero padding pads each phase convolution by one pixel on its own side; replicate padding pads the input by one
  edge pixel (the upsampled border repeats input row 0 / H - 1 either way, so this is exact) and each phase crops
  the side it does not read (negative padding). Four convolutions with O outputs rather than one with 4O: XLA:CPU
  runs their gradients 2-100x faster (bench/README.md section 2).
  """
  h, w, o = x.shape[-3], x.shape[-2], kernel.shape[-1]
  if conv_impl is not ConvImpl.XLA:
    kernel = cpu_conv.tie_kernel(x, kernel)
  if mode is Pad.REPLICATE:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")
    extra = 0
  else:
    extra = 1
  phases = []
  for dy in (0, 1):
    row = []
    for dx in (0, 1):
      pad = padding[:-2] + ((extra - dy, extra + dy - 1, Pad.ZEROS), (extra - dx, extra + dx - 1, Pad.ZEROS))
      row.append(_conv_float32(x, _phase_kernel(kernel, dy, dx), strides=None, padding=pad, dtype=dtype,
                               precision=precision, impl=conv_impl))
    phases.append(jnp.stack(row, axis=-2))  # [B, *s', H, W, 2 (dx), O]
  y = jnp.stack(phases, axis=-4)  # [B, *s', H, 2 (dy), W, 2 (dx), O]
  y = y.reshape(*y.shape[:-5], 2 * h, 2 * w, o)
  return (y + bias).astype(dtype)
