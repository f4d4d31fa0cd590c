"""CV-VAE: the 3D causal video VAE (8x space, 4x time), both released variants.

`CVVAE(variant="sd21")` is the SD2.1-compatible model (4 latent channels, original class `CVVAEModel`),
`CVVAE(variant="sd3")` the SD3-compatible one (16 latent channels, `CVVAESD3Model`). They share the SD layout
(4 levels, 128/256/512/512 channels, "2D+3D" res blocks) and differ in padding, GroupNorm epsilon, the
shortcut convolution and the SD2.1 decoder's temporal attention; `variant_style` has the details.

    vae = CVVAE(variant="sd21")
    posterior = vae.apply({"params": params}, video, method="encode")  # video [B, 1+4k, H, W, 3] in [-1, 1]
    frames = vae.apply({"params": params}, posterior.sample(rng), method="decode")  # [B, 1+4k, H, W, 3]

Nothing is scaled inside encode/decode; `scale_latent`/`unscale_latent` apply the diffusion convention
`(z - shift_factor) * scaling_factor`.
"""
from __future__ import annotations

import dataclasses

import jax

from cvvae_jax.models import layers
from cvvae_jax.models.autoencoder import Autoencoder, Decoder, Encoder
from cvvae_jax.models.distributions import DiagonalGaussian

VARIANTS = ("sd21", "sd3")


@dataclasses.dataclass(frozen=True)
class VariantStyle:
  encoder: layers.ConvStyle
  decoder: layers.ConvStyle
  norm_eps: float
  temporal_attention: bool


def variant_style(variant: str) -> VariantStyle:
  """The padding, epsilon and attention choices of a released variant (they matter for weight parity).

  sd21: encoder zero-pads space and replicate-pads 2 frames in front; its downsampler pads zeros right/bottom;
    decoder convs zero-pad T, H, W; upsample convs replicate-pad time, zero-pad space; 1x1x1 shortcuts;
    GroupNorm eps 1e-5; temporal attention in the decoder mid block.
  sd3: every 3D conv replicate-pads (encoder causal in time); the downsampler pads 1 on each side (replicate);
    per-frame 1x1 shortcuts; GroupNorm eps 1e-6; spatial attention only.
  """
  if variant == "sd21":
    return VariantStyle(
        encoder=layers.ConvStyle(video=True, causal=True, time_pad=layers.Pad.REPLICATE, space_pad=layers.Pad.ZEROS,
                                 down_space_pad="asymmetric", shortcut_3d=True),
        decoder=layers.ConvStyle(video=True, causal=False, time_pad=layers.Pad.ZEROS, space_pad=layers.Pad.ZEROS,
                                 up_time_pad=layers.Pad.REPLICATE, shortcut_3d=True),
        norm_eps=1e-5, temporal_attention=True)
  if variant == "sd3":
    rep = layers.Pad.REPLICATE
    return VariantStyle(
        encoder=layers.ConvStyle(video=True, causal=True, time_pad=rep, space_pad=rep, down_space_pad="symmetric"),
        decoder=layers.ConvStyle(video=True, causal=False, time_pad=rep, space_pad=rep, up_time_pad=rep),
        norm_eps=1e-6, temporal_attention=False)
  raise ValueError(f"unknown CV-VAE variant {variant!r}; expected one of {VARIANTS}")


def temporal_resampling(num_levels: int, temporal_compression: int) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
  """Which downsamplers (encoder order) and upsamplers (decoder execution order) also act on time.

  As in the original: even encoder levels halve time, and the decoder mirrors them, so 4 levels give 4x.
  """
  down = tuple(i % 2 == 0 for i in range(num_levels - 1))
  up = tuple((num_levels - 1 - i) % 2 == 1 for i in range(num_levels - 1))
  if 2 ** sum(down) != temporal_compression:
    raise ValueError(f"{num_levels} levels give {2 ** sum(down)}x temporal compression; "
                     f"expected temporal_compression={temporal_compression}")
  return down, up


class CVVAE(Autoencoder):
  """The CV-VAE video autoencoder. Video `[B, 1 + 4k, H, W, 3]` in [-1, 1] <-> latent `[B, 1 + k, H/8, W/8, C]`.

  An image is a 1-frame video; a 4D input `[B, H, W, 3]` is treated as T = 1.

  `original_tile_size`, `original_tile_overlap`, `original_round_frames`: how the original code tiles and chunks
  this model (its config.json's `tile_spatial_size`, `tile_overlap_ratio`, `en_de_n_frames_a_time`; None: no
  tiling / no chunking). Nothing here reads them: `inference`'s ORIGINAL mode does.
  """

  variant: str = "sd21"
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # encoder res blocks per level; the decoder has one more
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  half_3d: bool = True
  num_groups: int = 32
  temporal_compression: int = 4
  original_tile_size: int | None = 576  # pixels
  original_tile_overlap: float | None = 0.2222  # fraction of the tile
  original_round_frames: int | None = 16  # video frames per round (rounds take 1 more: 17), latents: 16 / 4

  def setup(self):
    style = variant_style(self.variant)
    down, up = temporal_resampling(len(self.block_out_channels), self.temporal_compression)
    common = dict(block_out_channels=tuple(self.block_out_channels), half_3d=self.half_3d,
                  num_groups=self.num_groups, epsilon=style.norm_eps, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision, remat=self.remat,
                  conv_impl=self.conv_impl, upsample_impl=self.upsample_impl,
                  activation_sharding=self.activation_sharding)
    self.encoder = Encoder(layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
                           style=style.encoder, temporal_downsample=down, **common)
    self.decoder = Decoder(layers_per_block=self.layers_per_block + 1, out_channels=self.out_channels,
                           style=style.decoder, temporal_upsample=up,
                           temporal_attention=style.temporal_attention, **common)

  def _check_video(self, x: jax.Array) -> jax.Array:
    if x.ndim == 4:
      x = x[:, None]
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"CVVAE.encode expects video [B, T, H, W, {self.in_channels}] (or an image batch "
                       f"[B, H, W, {self.in_channels}]), got shape {x.shape}")
    t, h, w = x.shape[1:4]
    tc, sc = self.temporal_compression, self.spatial_compression
    if (t - 1) % tc:
      raise ValueError(f"CVVAE.encode expects T = 1 + {tc}k frames (1, 5, 9, 17, ...), got T={t}")
    if h % sc or w % sc:
      raise ValueError(f"CVVAE.encode expects H and W to be multiples of {sc}, got H={h}, W={w}")
    return x

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Video `[B, 1 + 4k, H, W, 3]` in [-1, 1] -> posterior over latents `[B, 1 + k, H/8, W/8, C]`."""
    return DiagonalGaussian.from_moments(self.encoder(self._check_video(x)))

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent `[B, 1 + k, h, w, C]` (a 4D `[B, h, w, C]` is T = 1) -> video `[B, 1 + 4k, 8h, 8w, 3]`."""
    if z.ndim == 4:
      z = z[:, None]
    if z.ndim != 5 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"CVVAE.decode expects latents [B, T, h, w, {self.latent_channels}] (or [B, h, w, "
                       f"{self.latent_channels}]), got shape {z.shape}")
    return self.decoder(z)
