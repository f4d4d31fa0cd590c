"""Building blocks shared by the CV-VAE and the SD image VAE.

Everything is channels-last. A "video" activation is `[B, T, H, W, C]`, an "image" activation `[B, H, W, C]`.
The same blocks serve both: a `ConvStyle` says whether the main convolutions are 3D (video) or 2D (image) and
how each kind of convolution pads, which is where the released variants differ (see `ConvStyle`).

Parameters are created in `param_dtype` (float32); convolutions and attention run in `dtype` (float32 or
bfloat16); normalisation statistics are always computed in float32.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Array = jax.Array


class Pad(enum.Enum):
  """How a convolution pads one axis."""

  ZEROS = "zeros"
  REPLICATE = "replicate"


@dataclasses.dataclass(frozen=True)
class ConvStyle:
  """Padding and dimensionality of one encoder or decoder (static, hashable).

  Attributes:
    video: 3D (time, height, width) main convolutions on `[B, T, H, W, C]`; False: 2D convolutions on
      `[B, H, W, C]` (the image VAE).
    causal: pad time only in front (2 frames for kernel 3), none behind. Otherwise symmetric.
    time_pad: padding mode of the main 3x3x3 convolutions in time.
    space_pad: padding mode of the main convolutions in height and width.
    down_space_pad: spatial padding of the stride-2 downsample conv: "asymmetric" pads zeros right/bottom by one
      (the SD layout), "symmetric" pads one on each side with `space_pad`.
    up_time_pad: time padding mode of the upsample convolutions (symmetric, one frame each side).
    shortcut_3d: the 1x1 shortcut convolution of a res block is 1x1x1 (3D) rather than a per-frame 1x1 (2D).
  """

  video: bool
  causal: bool = False
  time_pad: Pad = Pad.ZEROS
  space_pad: Pad = Pad.ZEROS
  down_space_pad: str = "asymmetric"
  up_time_pad: Pad = Pad.ZEROS
  shortcut_3d: bool = False

  def __post_init__(self):
    if self.down_space_pad not in ("asymmetric", "symmetric"):
      raise ValueError(f"down_space_pad must be 'asymmetric' or 'symmetric', got {self.down_space_pad!r}")

  def main_padding(self, kernel: int = 3) -> tuple[tuple[int, int, Pad], ...]:
    """Padding of a stride-1 'same' convolution with a `kernel`-wide window on every axis."""
    p = kernel // 2
    space = ((p, p, self.space_pad),) * 2
    if not self.video:
      return space
    time = (2 * p, 0, self.time_pad) if self.causal else (p, p, self.time_pad)
    return (time,) + space

  def down_padding(self) -> tuple[tuple[int, int, Pad], ...]:
    """Padding of the 3x3(x3) stride-2 downsample convolution."""
    if self.down_space_pad == "asymmetric":
      space = ((0, 1, Pad.ZEROS),) * 2
    else:
      space = ((1, 1, self.space_pad),) * 2
    if not self.video:
      return space
    time = (2, 0, self.time_pad) if self.causal else (1, 1, self.time_pad)
    return (time,) + space

  def up_padding(self) -> tuple[tuple[int, int, Pad], ...]:
    """Padding of the 3x3(x3) convolution after nearest upsampling."""
    space = ((1, 1, self.space_pad),) * 2
    if not self.video:
      return space
    return ((1, 1, self.up_time_pad),) + space


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
  spatial = "DHW"[-rank:] if rank <= 3 else None
  if spatial is None:
    raise ValueError(f"only 1D-3D convolutions are supported, got rank {rank}")
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


class Conv(nn.Module):
  """N-d convolution with explicit per-axis padding (zeros or replicate), channels-last.

  Input `[B, *spatial, C_in]` -> output `[B, *spatial', features]`. The kernel is `[*kernel_size, C_in, features]`
  (for a 3D conv `[kt, kh, kw, C_in, C_out]`). `padding` gives `(before, after, Pad)` per spatial axis.
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...] | None = None
  padding: tuple[tuple[int, int, Pad], ...] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  upsample: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """With `upsample`, the convolution applies to `x` upsampled 2x (nearest) in its last two spatial axes (H, W),
    computed without the upsampled copy (`upsample_conv_apply`): `[B, *s, H, W, C]` -> `[B, *s', 2H, 2W, O]`."""
    rank = len(self.kernel_size)
    if x.ndim != rank + 2:
      raise ValueError(f"{self.name}: expected a rank-{rank + 2} input [B, *spatial, C], got shape {x.shape}")
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    if self.upsample:
      if self.strides is not None and any(s != 1 for s in self.strides):
        raise ValueError(f"{self.name}: upsample needs stride 1, got {self.strides}")
      return upsample_conv_apply(x, kernel, bias, padding=self.padding, dtype=self.dtype, precision=self.precision)
    return conv_apply(x, kernel, bias, strides=self.strides, padding=self.padding, dtype=self.dtype,
                      precision=self.precision)


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


class GroupNorm(nn.Module):
  """GroupNorm over (channels-in-group, *all other non-batch axes*), statistics in float32.

  For a video `[B, T, H, W, C]` the statistics span T, H and W jointly (as the original 3D models do); for an
  image `[B, H, W, C]` they span H and W. Output has the input's dtype.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{self.name}: channels {c} not divisible by num_groups {self.num_groups}")
    scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    y = (centred * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


def per_frame(fn: Callable[[Array], Array], x: Array) -> Array:
  """Applies an image function `[N, H, W, C] -> [N, H', W', C']` to each frame of a video `[B, T, H, W, C]`.

  An image input `[B, H, W, C]` is passed through unchanged.
  """
  if x.ndim == 4:
    return fn(x)
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


def attention(q: Array, k: Array, v: Array) -> Array:
  """Single-head softmax(q k^T / sqrt(C)) v over the sequence axis. q, k, v: `[N, L, C]` -> `[N, L, C]`.

  Logits and softmax are computed in float32.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("nqk,nkc->nqc", weights, v)


class SpatialAttention(nn.Module):
  """Single-head self-attention over the pixels of each image `[N, H, W, C]` -> `[N, H, W, C]`.

  GroupNorm (per image), q/k/v projections, attention, output projection; no residual (the caller adds it).
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = GroupNorm(self.num_groups, self.epsilon, self.param_dtype, name="norm")(x).reshape(n, h * w, c)
    out = attention(dense("q")(y), dense("k")(y), dense("v")(y))
    return dense("proj_out")(out).reshape(n, h, w, c)


class TemporalAttention(nn.Module):
  """Single-head self-attention over time at each pixel: `[B, T, H, W, C]` -> `[B, T, H, W, C]`.

  LayerNorm over channels, q/k/v projections, non-causal attention across T, output projection; no residual.
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = jnp.moveaxis(x, 1, 3).reshape(b * h * w, t, c)
    y = nn.LayerNorm(epsilon=self.epsilon, param_dtype=self.param_dtype, name="norm")(
        y.astype(jnp.float32)).astype(self.dtype)
    out = dense("proj_out")(attention(dense("q")(y), dense("k")(y), dense("v")(y)))
    return jnp.moveaxis(out.reshape(b, h, w, t, c), 3, 1)


class MidAttention(nn.Module):
  """The mid-block attention: `x + temporal(spatial(x))` (temporal part optional).

  Spatial attention runs on each frame independently (its GroupNorm statistics are per frame). Input and output
  `[B, T, H, W, C]` or `[B, H, W, C]`.
  """

  temporal: bool = False
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spatial = SpatialAttention(self.num_groups, self.epsilon, self.dtype, self.param_dtype, name="spatial")
    h = per_frame(spatial, x)
    if self.temporal:
      h = TemporalAttention(self.epsilon, self.dtype, self.param_dtype, name="temporal")(h)
    return x + h


class ResBlock(nn.Module):
  """Pre-norm residual block: norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 shortcut.

  For video (`style.video`), conv1 is 3D 3x3x3 with the style's padding; conv2 is a per-frame 2D 3x3 with zero
  padding when `half_3d` (the paper's "2D+3D" block), else 3D like conv1. For images both are 2D.
  `[B, (T,) H, W, C_in]` -> `[B, (T,) H, W, out_channels]`.
  """

  out_channels: int
  style: ConvStyle
  half_3d: bool = True
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    main_kernel = (3, 3, 3) if self.style.video else (3, 3)
    norm = lambda name: GroupNorm(self.num_groups, self.epsilon, self.param_dtype, name=name)
    h = nn.silu(norm("norm1")(x))
    h = Conv(self.out_channels, main_kernel, padding=self.style.main_padding(), name="conv1", **kw)(h)
    h = nn.silu(norm("norm2")(h))
    if self.style.video and not self.half_3d:
      h = Conv(self.out_channels, main_kernel, padding=self.style.main_padding(), name="conv2", **kw)(h)
    else:
      frame_pad = ((1, 1, Pad.ZEROS),) * 2
      h = per_frame(Conv(self.out_channels, (3, 3), padding=frame_pad, name="conv2", **kw), h)
    if x.shape[-1] != self.out_channels:
      if self.style.video and self.style.shortcut_3d:
        x = Conv(self.out_channels, (1, 1, 1), name="shortcut", **kw)(x)
      else:
        x = per_frame(Conv(self.out_channels, (1, 1), name="shortcut", **kw), x)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """Stride-2 3x3(x3) convolution: halves H and W, and T ((T - 1) / 2 + 1) when `temporal`.

  `[B, T, H, W, C]` -> `[B, T', H/2, W/2, C]` (video) or `[B, H, W, C]` -> `[B, H/2, W/2, C]` (image).
  """

  style: ConvStyle
  temporal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.style.video:
      kernel, strides = (3, 3, 3), (2 if self.temporal else 1, 2, 2)
    else:
      kernel, strides = (3, 3), (2, 2)
    return Conv(x.shape[-1], kernel, strides=strides, padding=self.style.down_padding(), dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)


def depth_to_time(x: Array, factor: int) -> Array:
  """`[B, T, H, W, factor * C]` -> `[B, factor * T, H, W, C]`: channel `n * C + c` becomes frame `factor * t + n`."""
  b, t, h, w, fc = x.shape
  c = fc // factor
  x = x.reshape(b, t, h, w, factor, c)
  x = jnp.moveaxis(x, 4, 2)
  return x.reshape(b, t * factor, h, w, c)


class Upsample(nn.Module):
  """Nearest 2x upsampling in H and W, then a 3x3(x3) convolution.

  With `temporal`, the convolution has 2C outputs which become two consecutive frames (depth-to-time), and the
  first frame is dropped: T -> 2T - 1. `[B, T, H, W, C]` -> `[B, T', 2H, 2W, C]` (or images without T).
  """

  style: ConvStyle
  temporal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kernel = (3, 3, 3) if self.style.video else (3, 3)
    factor = 2 if (self.temporal and self.style.video) else 1
    # The upsampling is folded into the convolution (`upsample_conv_apply`, same result, 16/36 of the FLOPs).
    y = Conv(c * factor, kernel, padding=self.style.up_padding(), dtype=self.dtype, param_dtype=self.param_dtype,
             precision=self.precision, upsample=True, name="conv")(x)
    if factor == 1:
      return y
    return depth_to_time(y, factor)[:, 1:]


def check_channels(name: str, got: Sequence[int], want: int) -> None:
  if got[-1] != want:
    raise ValueError(f"{name}: expected {want} channels in the last axis, got shape {tuple(got)}")
