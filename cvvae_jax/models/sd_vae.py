"""The Stable Diffusion image VAE (diffusers `AutoencoderKL`) in Flax: CV-VAE's frozen regularizer.

Images `[B, H, W, 3]` in [-1, 1] <-> latents `[B, H/8, W/8, C]`. SD2.1 config: 4 channels, quant/post-quant
1x1 convs, scaling factor 0.18215. SD3 config: 16 channels, no quant convs, scaling 1.5305, shift 0.0609.
Encoder and decoder are the same definitions as CV-VAE's (`autoencoder.py`) with 2D convolutions.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from cvvae_jax.models import layers
from cvvae_jax.models.autoencoder import Autoencoder, Decoder, Encoder
from cvvae_jax.models.distributions import DiagonalGaussian

PADDINGS = ("sd", "replicate")


def image_style(padding: str) -> layers.ConvStyle:
  """"sd": zero padding and the SD asymmetric downsample padding (the released image VAEs).
  "replicate": replicate padding everywhere and symmetric downsample padding, i.e. CV-VAE SD3's spatial padding
  (a model of this kind is what an SD3 CV-VAE inflated from it reproduces exactly on single frames).
  """
  if padding == "sd":
    return layers.ConvStyle(video=False)
  if padding == "replicate":
    return layers.ConvStyle(video=False, space_pad=layers.Pad.REPLICATE, down_space_pad="symmetric")
  raise ValueError(f"unknown image VAE padding {padding!r}; expected one of {PADDINGS}")


class ImageVAE(Autoencoder):
  """SD image autoencoder (KL). Params: encoder, decoder and, when configured, quant_conv / post_quant_conv."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # encoder res blocks per level; the decoder has one more
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  num_groups: int = 32
  norm_eps: float = 1e-6
  padding: str = "sd"

  def setup(self):
    style = image_style(self.padding)
    common = dict(block_out_channels=tuple(self.block_out_channels), style=style, num_groups=self.num_groups,
                  epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, remat=self.remat, conv_impl=self.conv_impl,
                  upsample_impl=self.upsample_impl, activation_sharding=self.activation_sharding)
    self.encoder = Encoder(layers_per_block=self.layers_per_block, latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(layers_per_block=self.layers_per_block + 1, out_channels=self.out_channels, **common)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv_impl=self.conv_impl,
              activation_sharding=self.activation_sharding)
    if self.use_quant_conv:
      self.quant_conv = layers.Conv(2 * self.latent_channels, (1, 1), **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = layers.Conv(self.latent_channels, (1, 1), **kw)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Images `[B, H, W, 3]` in [-1, 1] -> posterior over latents `[B, H/8, W/8, C]`."""
    sc = self.spatial_compression
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ImageVAE.encode expects images [B, H, W, {self.in_channels}], got shape {x.shape}")
    if x.shape[1] % sc or x.shape[2] % sc:
      raise ValueError(f"ImageVAE.encode expects H and W to be multiples of {sc}, got H={x.shape[1]}, "
                       f"W={x.shape[2]}")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments.astype(self.dtype)).astype(jnp.float32)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents `[B, h, w, C]` -> images `[B, 8h, 8w, 3]`."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"ImageVAE.decode expects latents [B, h, w, {self.latent_channels}], got shape {z.shape}")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z)
