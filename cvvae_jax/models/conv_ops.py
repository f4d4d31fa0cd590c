"""The convolutions under `layers.Conv`, channels-last, in the forms each platform runs best.

`conv_apply` is an N-d convolution with per-axis zero or replicate padding, `upsample_conv_apply` the same after a
nearest 2x upsampling in H and W, computed without the upsampled copy. Inputs `[B, *spatial, C_in]`, kernels
`[*k, C_in, C_out]`. A 3D convolution with more than one time tap is computed from 2D convolutions of frames;
on CPU, large frames run one output frame at a time (`_conv3d_frame_loop`) and derived kernels are made just
before their layer (`_kernel_when_used`). Convolutions accumulate in float32 whatever the compute dtype.
"""
from __future__ import annotations

import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Array = jax.Array


class Pad(enum.Enum):
  """How a convolution pads one axis."""

  ZEROS = "zeros"
  REPLICATE = "replicate"



def _dimension_numbers(rank: int) -> tuple[str, str, str]:
  spatial = "DHW"[-rank:] if rank <= 3 else None
  if spatial is None:
    raise ValueError(f"only 1D-3D convolutions are supported, got rank {rank}")
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")



def conv_apply(x: Array, kernel: Array, bias: Array, *, strides: tuple[int, ...] | None = None,
               padding: tuple[tuple[int, int, Pad], ...] | None = None, dtype: Dtype = jnp.float32,
               precision: Any = None) -> Array:
  """The function `Conv` computes: `x [B, *spatial, C_in]`, `kernel [*k, C_in, C_out]` -> `[B, *spatial', C_out]`."""
  return (_conv_float32(x, kernel, strides=strides, padding=padding, dtype=dtype, precision=precision)
          + bias).astype(dtype)


# Frames at least this large (H * W of a 3D convolution's input) are convolved one output frame at a time on CPU
# (`_conv3d_frame_loop`); smaller ones, where per-frame 2D convolutions are too small to run efficiently, tap by tap.
FRAME_LOOP_MIN_PIXELS = 64 * 64
# The CPU-only forms (that frame loop, `_kernel_when_used`) apply when lowering for CPU. False: CPU gets the program
# accelerators get, e.g. to estimate TPU/GPU memory with XLA:CPU (bench/train_cost.py). Read at trace time.
CPU_FORMS = True


def _conv_float32(x: Array, kernel: Array, *, strides: tuple[int, ...] | None, padding, dtype: Dtype,
                  precision: Any) -> Array:
  """`conv_apply` without the bias, in `dtype` with the float32 accumulator returned (not rounded to `dtype`)."""
  rank = kernel.ndim - 2
  padding = tuple(padding or ((0, 0, Pad.ZEROS),) * rank)
  strides = strides or (1,) * rank
  if (rank == 3 and kernel.shape[0] > 1) or kernel.dtype != dtype:  # kernel taps or a cast: derived per call
    x, kernel = _kernel_when_used(x, kernel)
  if rank == 3 and kernel.shape[0] > 1:
    time_pad, padding = padding[0], padding[1:]  # time padding: inside _conv3d_as_2d
  # Replicate padding is explicit; zero padding is folded into the convolution.
  edge = [(0, 0)] * (x.ndim - 1 - len(padding)) + [(lo, hi) if mode is Pad.REPLICATE else (0, 0)
                                                   for lo, hi, mode in padding] + [(0, 0)]
  if any(lo or hi for lo, hi in edge):
    x = jnp.pad(x, edge, mode="edge")
  conv_pad = [(lo, hi) if mode is Pad.ZEROS else (0, 0) for lo, hi, mode in padding]
  if rank == 3 and kernel.shape[0] > 1:
    return _conv3d_as_2d(x.astype(dtype), kernel.astype(dtype), strides, time_pad, conv_pad, precision)
  return lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), window_strides=strides, padding=conv_pad,
      dimension_numbers=_dimension_numbers(rank), precision=precision,
      preferred_element_type=jnp.float32)  # accumulate in float32 also for bf16 compute


def _kernel_when_used(x: Array, kernel: Array) -> tuple[Array, Array]:
  """`(x, kernel)` with the same values, but what is computed from this `kernel` now waits for `x`.

  Kernels derived from the params (time-tap slices, merged upsampling phases, casts to the compute dtype) depend on
  nothing else, so XLA computes those of every layer at the start of the program and keeps them all alive until
  their layer runs: most of a small decode's peak memory was such copies. Tied to the layer's input, they are made
  just before their convolution. The tie is a select on a predicate that is always true but that XLA cannot fold
  (`v == v or v != v` for a float v of `x`, NaN included); it fuses into the copy that derives the kernel.
  (`lax.optimization_barrier` does not do this: XLA:CPU removes barriers before scheduling.) CPU only: with `x`
  sharded over devices, reading one of its values is a collective (on a CPU mesh, one one-element all-reduce per
  layer), which accelerator meshes should not pay.
  """
  if not CPU_FORMS:
    return x, kernel

  def tie(x, kernel):
    v = lax.slice(x.reshape(-1), (0,), (1,))
    return jnp.where((v == v) | (v != v), kernel, jnp.zeros((), kernel.dtype))

  return x, lax.platform_dependent(x, kernel, cpu=tie, default=lambda x, kernel: kernel)


def _conv2d_frames(frames: Array, kernel: Array, strides, space_pad, precision) -> Array:
  return lax.conv_general_dilated(frames, kernel, window_strides=strides, padding=space_pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                                  preferred_element_type=jnp.float32)


def _conv3d_as_2d(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad, precision) -> Array:
  """A 3D convolution computed from 2D convolutions of frames: `[B, T, H, W, C]` -> `[B, T', H', W', O]`.

  `x` is already padded in H and W where that padding is explicit, `kernel [kt, kh, kw, C, O]`, `time_pad (before,
  after, Pad)`: output frame t is sum_k conv2d(padded frame s*t + k, kernel[k]). Same result as
  `conv_general_dilated` in 3D (up to summation order; the two forms below agree bit for bit); XLA's CPU backend
  runs 2D convolutions, and above all their gradients, much faster than 3D ones (bench/README.md section 2).

  On CPU, inputs with frames of at least `FRAME_LOOP_MIN_PIXELS` take `_conv3d_frame_loop` (one output frame at a
  time: no activation-sized intermediates) with the gradient of `_conv3d_taps`; elsewhere `_conv3d_taps`.
  """
  kt = kernel.shape[0]
  t_lo, t_hi, _ = time_pad
  t_out = (x.shape[1] + t_lo + t_hi - kt) // strides[0] + 1
  if t_out < 1:
    raise ValueError(f"temporal kernel {kt} does not fit {x.shape[1]} frames padded by ({t_lo}, {t_hi})")
  static = (tuple(strides), tuple(time_pad), tuple(tuple(p) for p in space_pad), precision)
  taps = lambda x, kernel: _conv3d_taps(x, kernel, *static)
  if not CPU_FORMS or x.shape[2] * x.shape[3] < FRAME_LOOP_MIN_PIXELS:
    return taps(x, kernel)
  return lax.platform_dependent(x, kernel, cpu=lambda x, kernel: _conv3d_looped(x, kernel, *static), default=taps)


def _conv3d_taps(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad, precision) -> Array:
  """`_conv3d_as_2d` as one batched 2D convolution of all frames per temporal tap (kt of them), summed.

  With time stride 1 the output of each tap is shifted in time instead of the input: a padding frame is a copy of
  frame 0 / T - 1 (replicate) or zero, so its 2D convolution is that frame's output or zero. This avoids a padded
  copy of `x` and one sliced copy per tap; the kt tap outputs still cost activation-sized buffers.
  """
  kt = kernel.shape[0]
  t_lo, t_hi, mode = time_pad
  b, t, h, w, c = x.shape
  if strides[0] != 1:
    return _conv3d_as_2d_padded(x, kernel, strides, time_pad, space_pad, precision)
  t_out = t + t_lo + t_hi - kt + 1
  frames = x.reshape(b * t, h, w, c)
  y = None
  for k in range(kt):
    z = _conv2d_frames(frames, kernel[k], strides[1:], space_pad, precision)
    z = _frames_at(z.reshape(b, t, *z.shape[1:]), k - t_lo, t_out, mode)
    y = z if y is None else y + z
  return y


def _conv3d_frame_loop(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad,
                       precision) -> Array:
  """`_conv3d_as_2d` one output frame at a time (a loop over time): `[B, T, H, W, C]` -> `[B, T', H', W', O]`.

  Output frame t sums the 2D convolutions of input frames s*t + k - before over the taps k; a replicate-padding
  frame reads the edge frame (the index is clamped), a zero-padding frame's tap is left out. Memory beyond input and
  output is one frame's worth, and the time is that of the batched form or less on CPU (bench/README.md section
  2.5). Any time stride. Its own gradient would be a slow per-frame loop: `_conv3d_looped` pairs it with the
  gradient of `_conv3d_taps`.
  """
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
      z = _conv2d_frames(lax.dynamic_index_in_dim(x, src, axis=1, keepdims=False), kernel[k], strides[1:],
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
def _conv3d_looped(x, kernel, strides, time_pad, space_pad, precision):
  """`_conv3d_frame_loop` with the gradient of `_conv3d_taps` (its residuals are just the inputs)."""
  return _conv3d_frame_loop(x, kernel, strides, time_pad, space_pad, precision)


def _conv3d_looped_fwd(x, kernel, strides, time_pad, space_pad, precision):
  return _conv3d_frame_loop(x, kernel, strides, time_pad, space_pad, precision), (x, kernel)


def _conv3d_looped_bwd(strides, time_pad, space_pad, precision, residuals, g):
  _, vjp = jax.vjp(lambda x, kernel: _conv3d_taps(x, kernel, strides, time_pad, space_pad, precision), *residuals)
  return vjp(g)


_conv3d_looped.defvjp(_conv3d_looped_fwd, _conv3d_looped_bwd)


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


def _conv3d_as_2d_padded(x: Array, kernel: Array, strides, time_pad: tuple[int, int, Pad], space_pad,
                         precision) -> Array:
  """`_conv3d_as_2d` by padding `x` in time and slicing the (strided) frames of each tap (any time stride)."""
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
    yk = _conv2d_frames(frames, kernel[k], strides[1:], space_pad, precision)
    y = yk if y is None else y + yk
  return y.reshape(b, t_out, *y.shape[1:])


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
                        precision: Any = None) -> Array:
  """`conv_apply(nearest_upsample_2x(x), kernel, bias, padding=padding)` without the upsampled copy ("sub-pixel").

  `x [B, *s, H, W, C]`, `kernel [*ks, 3, 3, C, O]` (`*s`/`*ks`: an optional leading time axis, not upsampled),
  `padding` per spatial axis with `(1, 1, mode)` on H and W, one mode for both (time: anything `conv_apply` takes)
  -> `[B, *s', 2H, 2W, O]`, the same result up to float summation order.

  Output phase (dy, dx) (pixels `(2i + dy, 2j + dx)`) is a 2x2 convolution of the low-resolution input with the
  3x3 taps merged (`_PHASE_TAPS`), reading input rows `(i - 1, i)` for dy = 0 and `(i, i + 1)` for dy = 1 (columns
  likewise): 16/36 of the multiply-adds, and no 4x copy. The four phase outputs are interleaved (depth-to-space).
  Zero padding pads each phase convolution by one pixel on its own side; replicate padding pads the input by one
  edge pixel (the upsampled border repeats input row 0 / H - 1 either way, so this is exact) and each phase crops
  the side it does not read (negative padding). Four convolutions with O outputs rather than one with 4O: XLA:CPU
  runs their gradients 2-100x faster (bench/README.md section 2).
  """
  rank = kernel.ndim - 2
  if kernel.shape[-4:-2] != (3, 3):
    raise ValueError(f"upsample_conv_apply: expected a 3x3 spatial kernel, got kernel shape {kernel.shape}")
  padding = tuple(padding or ((0, 0, Pad.ZEROS),) * rank)
  modes = {mode for _, _, mode in padding[-2:]}
  if any((lo, hi) != (1, 1) for lo, hi, _ in padding[-2:]) or len(modes) != 1:
    raise ValueError(f"upsample_conv_apply: expected padding (1, 1, mode) in H and W, one mode, got {padding}")
  h, w, o = x.shape[-3], x.shape[-2], kernel.shape[-1]
  x, kernel = _kernel_when_used(x, kernel)
  if modes == {Pad.REPLICATE}:
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
                               precision=precision))
    phases.append(jnp.stack(row, axis=-2))  # [B, *s', H, W, 2 (dx), O]
  y = jnp.stack(phases, axis=-4)  # [B, *s', H, 2 (dy), W, 2 (dx), O]
  y = y.reshape(*y.shape[:-5], 2 * h, 2 * w, o)
  return (y + bias).astype(dtype)
