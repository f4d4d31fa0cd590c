"""Building blocks shared by the CV-VAE and the SD image VAE: Conv, GroupNorm, attention, res blocks, resamplers.

Everything is channels-last. A "video" activation is `[B, T, H, W, C]`, an "image" activation `[B, H, W, C]`.
The same blocks serve both: a `ConvStyle` says whether the main convolutions are 3D (video) or 2D (image) and
how each kind of convolution pads, which is where the released variants differ (see `ConvStyle`).

Parameters are created in `param_dtype` (float32); convolutions and attention run in `dtype` (float32 or
bfloat16); normalisation statistics are always computed in float32. How convolutions are computed is the static
choice of `conv_impl` and `upsample_impl` (`conv_impl.ConvImpl`, `UpsampleImpl`; "auto": per platform), fields of
every module that holds convolutions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cvvae_jax.models import partitioning, remat as remat_lib
from cvvae_jax.models.conv_ops import Pad, conv_apply, upsample_conv_apply

Dtype = Any
Array = jax.Array


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


class Conv(nn.Module):
  """N-d convolution with explicit per-axis padding (zeros or replicate), channels-last.

  Input `[B, *spatial, C_in]` -> output `[B, *spatial', features]`. The kernel is `[*kernel_size, C_in, features]`
  (for a 3D conv `[kt, kh, kw, C_in, C_out]`). `padding` gives `(before, after, Pad)` per spatial axis.
  `conv_impl` / `upsample_impl`: the algorithm (`conv_ops.conv_apply` / `upsample_conv_apply`), same parameters.
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
  conv_impl: str = "auto"
  upsample_impl: str = "auto"
  activation_sharding: Any = None  # a `partitioning.ActivationSharding`: the kernel is gathered where it is used

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """With `upsample`, the convolution applies to `x` upsampled 2x (nearest) in its last two spatial axes (H, W),
    computed as `upsample_impl` chooses (`upsample_conv_apply`): `[B, *s, H, W, C]` -> `[B, *s', 2H, 2W, O]`."""
    rank = len(self.kernel_size)
    if x.ndim != rank + 2:
      raise ValueError(f"{self.name}: expected a rank-{rank + 2} input [B, *spatial, C], got shape {x.shape}")
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    kernel = partitioning.gather_at_use(kernel, self.activation_sharding)
    if self.upsample:
      if self.strides is not None and any(s != 1 for s in self.strides):
        raise ValueError(f"{self.name}: upsample needs stride 1, got {self.strides}")
      return upsample_conv_apply(x, kernel, bias, padding=self.padding, dtype=self.dtype, precision=self.precision,
                                 impl=self.upsample_impl, conv_impl=self.conv_impl)
    return conv_apply(x, kernel, bias, strides=self.strides, padding=self.padding, dtype=self.dtype,
                      precision=self.precision, impl=self.conv_impl)



class GroupNorm(nn.Module):
  """GroupNorm over (channels-in-group, *all other non-batch axes*), statistics in float32.

  For a video `[B, T, H, W, C]` the statistics span T, H and W jointly (as the original 3D models do); for an
  image `[B, H, W, C]` they span H and W. Output has the input's dtype. A float32 input is differentiated by JAX
  (autodiff keeps float32 copies of the centred input); a lower-precision one (bf16 compute) goes through
  `group_norm_low_precision`: the same forward, and a backward that keeps only the input and the statistics and
  rebuilds the normalised values inside fused reductions (no full-size float32 buffer).
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
    if x.dtype != jnp.float32:
      return group_norm_low_precision(x, scale, bias, self.num_groups, self.epsilon)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = _stat_axes(xf.ndim)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    y = (centred * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


def _grouped(x: Array, num_groups: int) -> Array:
  """`[B, *s, C]` -> float32 `[B, *s, G, C / G]`."""
  return x.astype(jnp.float32).reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)


def _stat_axes(ndim: int) -> tuple[int, ...]:
  """The axes of a grouped `[B, *s, G, C / G]` array that one group's statistics span (all but B and G)."""
  return tuple(range(1, ndim - 2)) + (ndim - 1,)


def _group_stats(x: Array, num_groups: int, epsilon: float) -> tuple[Array, Array]:
  """Per (batch, group) mean and 1 / std of `x [B, *s, C]`, float32 `[B, 1.., G, 1]`."""
  xf = _grouped(x, num_groups)
  axes = _stat_axes(xf.ndim)
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
  return mean, lax.rsqrt(var + epsilon)


def _group_normalize(x: Array, mean: Array, rstd: Array, scale: Array, bias: Array, num_groups: int) -> Array:
  y = ((_grouped(x, num_groups) - mean) * rstd).reshape(x.shape)
  return (y * scale + bias).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_low_precision(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
  """`GroupNorm` of a bf16 (or other low-precision) `x [B, *s, C]` with float32 `scale`, `bias [C]`: statistics and
  arithmetic in float32, output in `x.dtype`; the backward keeps `x` and the statistics only."""
  mean, rstd = _group_stats(x, num_groups, epsilon)
  return _group_normalize(x, mean, rstd, scale, bias, num_groups)


def _gn_fwd(x, scale, bias, num_groups, epsilon):
  mean, rstd = _group_stats(x, num_groups, epsilon)
  return _group_normalize(x, mean, rstd, scale, bias, num_groups), (x, mean, rstd, scale)


def _gn_bwd(num_groups, epsilon, res, g):
  """Two reductions over the full-size arrays (per batch element and channel: sum(g) and sum(g * xhat)), then
  one elementwise pass for the input's gradient; xhat = (x - mean) * rstd is recomputed where it is used."""
  x, mean, rstd, scale = res
  grouped_shape = (*x.shape[:-1], num_groups, x.shape[-1] // num_groups)
  axes = tuple(range(1, len(grouped_shape) - 2))  # everything but batch, group, channel-in-group
  xhat = (_grouped(x, num_groups) - mean) * rstd
  gf = g.astype(jnp.float32).reshape(grouped_shape)
  sum_g = jnp.sum(gf, axis=axes, keepdims=True)
  sum_gxhat = jnp.sum(gf * xhat, axis=axes, keepdims=True)
  grouped_scale = scale.reshape(grouped_shape[-2:])
  n = x.size // (x.shape[0] * num_groups)  # elements per (batch element, group)
  mean_gx = jnp.sum(sum_g * grouped_scale, axis=-1, keepdims=True) / n
  mean_gx_xhat = jnp.sum(sum_gxhat * grouped_scale, axis=-1, keepdims=True) / n
  dx = rstd * (gf * grouped_scale - mean_gx - xhat * mean_gx_xhat)
  d_scale = jnp.sum(sum_gxhat, axis=(0, *axes)).reshape(scale.shape)
  d_bias = jnp.sum(sum_g, axis=(0, *axes)).reshape(scale.shape)
  return dx.reshape(x.shape).astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


group_norm_low_precision.defvjp(_gn_fwd, _gn_bwd)


def per_frame(fn: Callable[[Array], Array], x: Array) -> Array:
  """Applies an image function `[N, H, W, C] -> [N, H', W', C']` to each frame of a video `[B, T, H, W, C]`.

  An image input `[B, H, W, C]` is passed through unchanged.
  """
  if x.ndim == 4:
    return fn(x)
  y = fn(einops.rearrange(x, "b t h w c -> (b t) h w c"))
  return einops.rearrange(y, "(b t) h w c -> b t h w c", b=x.shape[0])


def attention(q: Array, k: Array, v: Array) -> Array:
  """Single-head softmax(q k^T / sqrt(C)) v over the sequence axis. q, k, v: `[N, L, C]` -> `[N, L, C]`.

  `jax.nn.dot_product_attention` with its implementation left to XLA (a GPU may take cuDNN's fused kernel; the
  mid-block attention of a 72x72-latent tile is 5,184 tokens); logits and softmax are computed in float32.
  """
  one_head = lambda a: a[:, :, None, :]  # [N, L, 1 head, C]
  return jax.nn.dot_product_attention(one_head(q), one_head(k), one_head(v))[:, :, 0, :]


class Dense(nn.Module):
  """`flax.linen.Dense` (the same parameters, initializers and arithmetic) whose kernel is gathered where it is used
  on a spatial mesh (`partitioning.gather_at_use`). `[..., C_in]` -> `[..., features]`."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    kernel = partitioning.gather_at_use(kernel, self.activation_sharding)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


class SpatialAttention(nn.Module):
  """Single-head self-attention over the pixels of each image `[N, H, W, C]` -> `[N, H, W, C]`.

  GroupNorm (per image), q/k/v projections, attention, output projection; no residual (the caller adds it).
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    dense = lambda name: Dense(c, self.dtype, self.param_dtype, self.activation_sharding, name=name)
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
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, _, h, w, c = x.shape
    dense = lambda name: Dense(c, self.dtype, self.param_dtype, self.activation_sharding, name=name)
    y = einops.rearrange(x, "b t h w c -> (b h w) t c")
    y = nn.LayerNorm(epsilon=self.epsilon, param_dtype=self.param_dtype, name="norm")(
        y.astype(jnp.float32)).astype(self.dtype)
    out = dense("proj_out")(attention(dense("q")(y), dense("k")(y), dense("v")(y)))
    return einops.rearrange(out, "(b h w) t c -> b t h w c", b=b, h=h, w=w)


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
  activation_sharding: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spatial = SpatialAttention(self.num_groups, self.epsilon, self.dtype, self.param_dtype, self.activation_sharding,
                               name="spatial")
    h = per_frame(spatial, x)
    if self.temporal:
      h = TemporalAttention(self.epsilon, self.dtype, self.param_dtype, self.activation_sharding, name="temporal")(h)
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
  conv_impl: str = "auto"
  remat: Any = "none"  # a policy of `remat.py`; "full_halves" recomputes the two halves of the block separately
  activation_sharding: Any = None  # a `partitioning.ActivationSharding`: kernels gathered where they are used

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = remat_lib.function(ResBlock._first_half, self.remat, "res_halves")(self, x)
    return remat_lib.function(ResBlock._second_half, self.remat, "res_halves")(self, x, h)

  def _kw(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv_impl=self.conv_impl,
                activation_sharding=self.activation_sharding)

  def _norm(self, name: str) -> GroupNorm:
    return GroupNorm(self.num_groups, self.epsilon, self.param_dtype, name=name)

  def _first_half(self, x: Array) -> Array:
    """norm1 -> SiLU -> conv1."""
    main_kernel = (3, 3, 3) if self.style.video else (3, 3)
    h = nn.silu(self._norm("norm1")(x))
    return Conv(self.out_channels, main_kernel, padding=self.style.main_padding(), name="conv1", **self._kw())(h)

  def _second_half(self, x: Array, h: Array) -> Array:
    """norm2 -> SiLU -> conv2, plus the shortcut of the block's input `x`."""
    kw = self._kw()
    h = nn.silu(self._norm("norm2")(h))
    if self.style.video and not self.half_3d:
      h = Conv(self.out_channels, (3, 3, 3), padding=self.style.main_padding(), name="conv2", **kw)(h)
    else:
      frame_pad = ((1, 1, Pad.ZEROS),) * 2
      h = per_frame(Conv(self.out_channels, (3, 3), padding=frame_pad, name="conv2", **kw), h)
    if x.shape[-1] != self.out_channels:
      if self.style.video and self.style.shortcut_3d:
        x = Conv(self.out_channels, (1, 1, 1), name="shortcut", **kw)(x)
      else:
        x = per_frame(Conv(self.out_channels, (1, 1), name="shortcut", **kw), x)
    return x.astype(h.dtype) + h


class Resampler(nn.Module):
  """The fields of `Downsample` and `Upsample`: the style, whether time is resampled too, dtypes, algorithms."""

  style: ConvStyle
  temporal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv_impl: str = "auto"
  upsample_impl: str = "auto"
  activation_sharding: Any = None  # a `partitioning.ActivationSharding`: the kernel is gathered where it is used


class Downsample(Resampler):
  """Stride-2 3x3(x3) convolution: halves H and W, and T ((T - 1) / 2 + 1) when `temporal`.

  `[B, T, H, W, C]` -> `[B, T', H/2, W/2, C]` (video) or `[B, H, W, C]` -> `[B, H/2, W/2, C]` (image).
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.style.video:
      kernel, strides = (3, 3, 3), (2 if self.temporal else 1, 2, 2)
    else:
      kernel, strides = (3, 3), (2, 2)
    return Conv(x.shape[-1], kernel, strides=strides, padding=self.style.down_padding(), dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, conv_impl=self.conv_impl,
                activation_sharding=self.activation_sharding, name="conv")(x)


def depth_to_time(x: Array, factor: int) -> Array:
  """`[B, T, H, W, factor * C]` -> `[B, factor * T, H, W, C]`: channel `n * C + c` becomes frame `factor * t + n`."""
  return einops.rearrange(x, "b t h w (n c) -> b (t n) h w c", n=factor)


class Upsample(Resampler):
  """Nearest 2x upsampling in H and W, then a 3x3(x3) convolution.

  With `temporal`, the convolution has 2C outputs which become two consecutive frames (depth-to-time), and the
  first frame is dropped: T -> 2T - 1. `[B, T, H, W, C]` -> `[B, T', 2H, 2W, C]` (or images without T).
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kernel = (3, 3, 3) if self.style.video else (3, 3)
    factor = 2 if (self.temporal and self.style.video) else 1
    # The upsampling is part of the convolution (`upsample_conv_apply`; sub-pixel: 16/36 of the FLOPs).
    y = Conv(c * factor, kernel, padding=self.style.up_padding(), dtype=self.dtype, param_dtype=self.param_dtype,
             precision=self.precision, upsample=True, conv_impl=self.conv_impl, upsample_impl=self.upsample_impl,
             activation_sharding=self.activation_sharding, name="conv")(x)
    if factor == 1:
      return y
    return depth_to_time(y, factor)[:, 1:]
