"""The CPU forms of a 3D convolution with several time taps, for XLA:CPU (chosen by `conv_impl`, see `conv_ops`).

XLA's CPU backend runs 2D convolutions, and above all their gradients, much faster than 3D ones (bench/README.md
section 2), so on CPU a 3D convolution `[B, T, H, W, C] -> [B, T', H', W', O]` with kernel `[kt, kh, kw, C, O]`,
kt > 1, is computed from 2D convolutions of frames: output frame t is `sum_k conv2d(padded frame s*t + k,
kernel[k])`. Two forms, bit-identical to each other (outputs and gradients), equal to the 3D convolution up to
float summation order:

  `conv3d_taps`        one batched 2D convolution of all frames per time tap, summed (kt activation-sized outputs);
  `conv3d_frame_loop`  one output frame at a time (a `fori_loop`; nothing activation-sized besides input and output),
                       with the gradient of the tap form (`conv3d_looped`).

`conv3d_cpu` takes the frame loop for frames of at least `FRAME_LOOP_MIN_PIXELS` and the tap form below (section
2.5). `tie_kernel` makes kernels derived from the params wait for their layer's input (section 2.6).

Shared arguments: `x` is already padded in H and W where that padding is explicit; `strides (st, sh, sw)`,
`time_pad (before, after, Pad)`, `space_pad ((lo, hi), (lo, hi))` the implicit zero padding of H and W, `precision`.
Accumulation is in float32 (the result is float32).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cvvae_jax.models.conv_impl import Pad

Array = jax.Array

# Frames at least this large (H * W of a 3D convolution's input) are convolved one output frame at a time by
# `conv3d_cpu`; smaller ones, where per-frame 2D convolutions are too small to run efficiently, tap by tap.
FRAME_LOOP_MIN_PIXELS = 64 * 64


def tie_kernel(x: Array, kernel: Array) -> Array:
  """`kernel` with the same values, but what is computed from it now waits for `x`.

  Kernels derived from the params (time-tap slices, merged upsampling phases, casts to the compute dtype) depend on
  nothing else, so XLA computes those of every layer at the start of the program and keeps them all alive until
  their layer runs: most of a small decode's peak memory was such copies. Tied to the layer's input, they are made
  just before their convolution. The tie is a select on a predicate that is always true but that XLA cannot fold
  (`v == v or v != v` for a float v of `x`, NaN included); it fuses into the copy that derives the kernel.
  (`lax.optimization_barrier` does not do this: XLA:CPU removes barriers before scheduling.) For CPU: with `x`
  sharded over devices, reading one of its values is a collective (on a CPU mesh, one one-element all-reduce per
  layer), which accelerator meshes should not pay.
  """
  v = lax.slice(x.reshape(-1), (0,), (1,))
  return jnp.where((v == v) | (v != v), kernel, jnp.zeros((), kernel.dtype))


def conv2d_frames(frames: Array, kernel: Array, strides, space_pad, precision) -> Array:
  """A 2D convolution of frames `[N, H, W, C]` with `kernel [kh, kw, C, O]`, accumulated in float32."""
  return lax.conv_general_dilated(frames, kernel, window_strides=strides, padding=space_pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                                  preferred_element_type=jnp.float32)


def _check_fits(x: Array, kernel: Array, strides, time_pad) -> None:
  kt, (t_lo, t_hi, _) = kernel.shape[0], time_pad
  if (x.shape[1] + t_lo + t_hi - kt) // strides[0] + 1 < 1:
    raise ValueError(f"temporal kernel {kt} does not fit {x.shape[1]} frames padded by ({t_lo}, {t_hi})")


def conv3d_cpu(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad, precision) -> Array:
  """`conv3d_looped` for frames of at least `FRAME_LOOP_MIN_PIXELS`, else `conv3d_taps` (what is faster on CPU)."""
  _check_fits(x, kernel, strides, time_pad)
  static = (tuple(strides), tuple(time_pad), tuple(tuple(p) for p in space_pad), precision)
  if x.shape[2] * x.shape[3] < FRAME_LOOP_MIN_PIXELS:
    return conv3d_taps(x, kernel, *static)
  return conv3d_looped(x, kernel, *static)


def conv3d_taps(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad, precision) -> Array:
  """The 3D convolution as one batched 2D convolution of all frames per temporal tap (kt of them), summed.

  With time stride 1 the output of each tap is shifted in time instead of the input: a padding frame is a copy of
  frame 0 / T - 1 (replicate) or zero, so its 2D convolution is that frame's output or zero. This avoids a padded
  copy of `x` and one sliced copy per tap; the kt tap outputs still cost activation-sized buffers.
  """
  _check_fits(x, kernel, strides, time_pad)
  kt = kernel.shape[0]
  t_lo, t_hi, mode = time_pad
  b, t, h, w, c = x.shape
  if strides[0] != 1:
    return _conv3d_taps_padded(x, kernel, strides, time_pad, space_pad, precision)
  t_out = t + t_lo + t_hi - kt + 1
  frames = x.reshape(b * t, h, w, c)
  y = None
  for k in range(kt):
    z = conv2d_frames(frames, kernel[k], strides[1:], space_pad, precision)
    z = _frames_at(z.reshape(b, t, *z.shape[1:]), k - t_lo, t_out, mode)
    y = z if y is None else y + z
  return y


def conv3d_frame_loop(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad,
                      precision) -> Array:
  """The 3D convolution one output frame at a time (a loop over time): `[B, T, H, W, C]` -> `[B, T', H', W', O]`.

  Output frame t sums the 2D convolutions of input frames s*t + k - before over the taps k; a replicate-padding
  frame reads the edge frame (the index is clamped), a zero-padding frame's tap is left out. Memory beyond input and
  output is one frame's worth, and the time is that of the tap form or less on CPU (bench/README.md section 2.5).
  Any time stride. Its own gradient would be a slow per-frame loop: `conv3d_looped` pairs it with the gradient of
  `conv3d_taps`.
  """
  _check_fits(x, kernel, strides, time_pad)
  kt = kernel.shape[0]
  t_lo, t_hi, mode = time_pad
  t = x.shape[1]
  st = strides[0]
  t_out = (t + t_lo + t_hi - kt) // st + 1

  def taps_of(i: int) -> tuple[int, ...]:  # the taps of output frame i that read a frame (static)
    return tuple(k for k in range(kt) if mode is Pad.REPLICATE or 0 <= st * i + k - t_lo < t)

  def frame(i, taps):
    y = jnp.zeros(shape, jnp.float32) if not taps else None  # every tap in the zero padding
    for k in taps:
      src = jnp.clip(st * i + k - t_lo, 0, t - 1)
      z = conv2d_frames(lax.dynamic_index_in_dim(x, src, axis=1, keepdims=False), kernel[k], strides[1:],
                        space_pad, precision)
      y = z if y is None else y + z
    return y

  every = tuple(range(kt))
  shape = jax.eval_shape(lambda: frame(0, every)).shape  # one output frame [B, H', W', O]
  full = [i for i in range(t_out) if taps_of(i) == every]  # contiguous
  first, end = (full[0], full[-1] + 1) if full else (t_out, t_out)
  # The output buffer starts as frame 0 repeated: an input-dependent fill that XLA allocates just before the loop
  # (a zeros fill is one constant shared by every such loop, allocated and copied for each at the program's start).
  out = jnp.broadcast_to(frame(0, taps_of(0))[:, None], (shape[0], t_out, *shape[1:]))
  for i in [*range(1, first), *range(end, t_out)]:  # frames with zero-padding taps: only their own taps
    out = lax.dynamic_update_index_in_dim(out, frame(i, taps_of(i)), i, axis=1)
  body = lambda i, out: lax.dynamic_update_index_in_dim(out, frame(i, every), i, axis=1)
  return lax.fori_loop(max(first, 1), end, body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv3d_looped(x, kernel, strides, time_pad, space_pad, precision):
  """`conv3d_frame_loop` with the gradient of `conv3d_taps` (its residuals are just the inputs)."""
  return conv3d_frame_loop(x, kernel, strides, time_pad, space_pad, precision)


def _conv3d_looped_fwd(x, kernel, strides, time_pad, space_pad, precision):
  return conv3d_frame_loop(x, kernel, strides, time_pad, space_pad, precision), (x, kernel)


def _conv3d_looped_bwd(strides, time_pad, space_pad, precision, residuals, g):
  _, vjp = jax.vjp(lambda x, kernel: conv3d_taps(x, kernel, strides, time_pad, space_pad, precision), *residuals)
  return vjp(g)


conv3d_looped.defvjp(_conv3d_looped_fwd, _conv3d_looped_bwd)


def _frames_at(z: Array, offset: int, n: int, mode: Pad) -> Array:
  """Frames `offset, ..., offset + n - 1` of `z [B, T, ...]`, outside [0, T) the edge frame or zeros (`mode`)."""
  t = z.shape[1]
  front = min(max(-offset, 0), n)
  back = min(max(offset + n - t, 0), n - front)
  start = max(offset, 0)
  pieces = []
  for count, frame in ((front, 0), (None, None), (back, t - 1)):
    if frame is None:
      if n - front - back:
        pieces.append(z[:, start:start + n - front - back])
    elif count:
      edge = z[:, frame:frame + 1] if mode is Pad.REPLICATE else jnp.zeros_like(z[:, :1])
      pieces.append(jnp.broadcast_to(edge, (z.shape[0], count, *z.shape[2:])))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _conv3d_taps_padded(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad,
                        precision: Any) -> Array:
  """`conv3d_taps` by padding `x` in time and slicing the (strided) frames of each tap (any time stride)."""
  kt = kernel.shape[0]
  t_lo, t_hi, mode = time_pad
  if t_lo or t_hi:
    x = jnp.pad(x, [(0, 0), (t_lo, t_hi), (0, 0), (0, 0), (0, 0)],
                mode="edge" if mode is Pad.REPLICATE else "constant")
  b, t, h, w, c = x.shape
  st = strides[0]
  t_out = (t - kt) // st + 1
  y = None
  for k in range(kt):
    frames = x[:, k:k + st * (t_out - 1) + 1:st].reshape(b * t_out, h, w, c)
    yk = conv2d_frames(frames, kernel[k], strides[1:], space_pad, precision)
    y = yk if y is None else y + yk
  return y.reshape(b, t_out, *y.shape[1:])
