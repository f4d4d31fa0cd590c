"""The SD-layout encoder and decoder, written once for video (CV-VAE) and images (the SD image VAE).

A `ConvStyle` (see `layers.py`) chooses 3D or 2D convolutions and their padding, so the CV-VAE variants and the
image VAE share one definition and one parameter naming:

  encoder: conv_in, down_{i}/res_{j}, down_{i}/downsample, mid/res_0, mid/attn, mid/res_1, norm_out, conv_out
  decoder: conv_in, mid/res_0, mid/attn, mid/res_1, up_{i}/res_{j}, up_{i}/upsample, norm_out, conv_out

Levels are numbered in execution order: `down_0` sees full resolution, `up_0` is the deepest (first executed)
decoder level.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvvae_jax import layers

Array = jax.Array


def _res_block_cls(remat: bool):
  return nn.remat(layers.ResBlock) if remat else layers.ResBlock


class Level(nn.Module):
  """One resolution level: `num_blocks` res blocks to `channels`, then an optional down/upsampler.

  `resample` is None for no resampler, else whether the resampler also acts on time.
  """

  channels: int
  num_blocks: int
  direction: str  # "down" | "up"
  resample: bool | None
  remat: bool
  block_kw: dict

  @nn.compact
  def __call__(self, h: Array) -> Array:
    res_cls = _res_block_cls(self.remat)
    for j in range(self.num_blocks):
      h = res_cls(self.channels, name=f"res_{j}", **self.block_kw)(h)
    if self.resample is None:
      return h
    kw = {k: self.block_kw[k] for k in ("dtype", "param_dtype", "precision")}
    if self.direction == "down":
      return layers.Downsample(self.block_kw["style"], self.resample, name="downsample", **kw)(h)
    return layers.Upsample(self.block_kw["style"], self.resample, name="upsample", **kw)(h)


class MidBlock(nn.Module):
  """res_0 -> attention (spatial, plus temporal when asked) -> res_1, at constant channels."""

  temporal_attention: bool
  remat: bool
  block_kw: dict

  @nn.compact
  def __call__(self, h: Array) -> Array:
    res_cls = _res_block_cls(self.remat)
    kw = self.block_kw
    h = res_cls(h.shape[-1], name="res_0", **kw)(h)
    h = layers.MidAttention(self.temporal_attention, kw["num_groups"], kw["epsilon"], kw["dtype"], kw["param_dtype"],
                            name="attn")(h)
    return res_cls(h.shape[-1], name="res_1", **kw)(h)


class Encoder(nn.Module):
  """`[B, T, H, W, 3]` (or `[B, H, W, 3]`) -> moments `[B, T', H/2^(L-1), W/2^(L-1), 2 * latent_channels]`.

  Attributes:
    block_out_channels: channels of each level (SD: 128, 256, 512, 512).
    layers_per_block: res blocks per level (SD: 2).
    latent_channels: C of the latent; the encoder outputs 2C (mean and log-variance).
    style: padding/dimensionality, see `layers.ConvStyle`.
    temporal_downsample: per downsampler (levels 0..L-2), whether it also halves time (video only).
    half_3d: "2D+3D" res blocks (conv2 per frame) rather than all-3D.
  """

  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  style: layers.ConvStyle
  temporal_downsample: tuple[bool, ...] = ()
  half_3d: bool = True
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    block_kw = dict(style=self.style, half_3d=self.half_3d, num_groups=self.num_groups, epsilon=self.epsilon, **kw)
    kernel = (3, 3, 3) if self.style.video else (3, 3)
    h = layers.Conv(self.block_out_channels[0], kernel, padding=self.style.main_padding(), name="conv_in", **kw)(
        x.astype(self.dtype))
    num_levels = len(self.block_out_channels)
    for i, channels in enumerate(self.block_out_channels):
      resample = None
      if i < num_levels - 1:
        resample = bool(self.temporal_downsample[i]) if self.style.video else False
      h = Level(channels, self.layers_per_block, "down", resample, self.remat, block_kw, name=f"down_{i}")(h)
    h = MidBlock(False, self.remat, block_kw, name="mid")(h)
    h = nn.silu(layers.GroupNorm(self.num_groups, self.epsilon, self.param_dtype, name="norm_out")(h))
    h = layers.Conv(2 * self.latent_channels, kernel, padding=self.style.main_padding(), name="conv_out", **kw)(h)
    return h.astype(jnp.float32)


class Decoder(nn.Module):
  """Latent `[B, T', h, w, C]` (or `[B, h, w, C]`) -> `[B, T, h * 2^(L-1), w * 2^(L-1), out_channels]`.

  Attributes mirror `Encoder`; `layers_per_block` here counts the decoder's res blocks per level (SD: 3);
  `temporal_upsample` is per upsampler in execution order; `temporal_attention` adds the SD2.1 variant's
  temporal attention after the mid spatial attention.
  """

  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_channels: int
  style: layers.ConvStyle
  temporal_upsample: tuple[bool, ...] = ()
  temporal_attention: bool = False
  half_3d: bool = True
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    block_kw = dict(style=self.style, half_3d=self.half_3d, num_groups=self.num_groups, epsilon=self.epsilon, **kw)
    kernel = (3, 3, 3) if self.style.video else (3, 3)
    channels = tuple(reversed(self.block_out_channels))
    h = layers.Conv(channels[0], kernel, padding=self.style.main_padding(), name="conv_in", **kw)(z.astype(self.dtype))
    h = MidBlock(self.temporal_attention and self.style.video, self.remat, block_kw, name="mid")(h)
    for i, c in enumerate(channels):
      resample = None
      if i < len(channels) - 1:
        resample = bool(self.temporal_upsample[i]) if self.style.video else False
      h = Level(c, self.layers_per_block, "up", resample, self.remat, block_kw, name=f"up_{i}")(h)
    h = nn.silu(layers.GroupNorm(self.num_groups, self.epsilon, self.param_dtype, name="norm_out")(h))
    # The input of the last layer, for the adaptive GAN weight (gradients at conv_out's kernel).
    self.sow("intermediates", "conv_out_input", h)
    h = layers.Conv(self.out_channels, kernel, padding=self.style.main_padding(), name="conv_out", **kw)(h)
    return h.astype(jnp.float32)
