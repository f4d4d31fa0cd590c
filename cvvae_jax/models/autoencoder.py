"""The SD-layout encoder and decoder, written once for video (CV-VAE) and images (the SD image VAE).

A `ConvStyle` (see `layers.py`) chooses 3D or 2D convolutions and their padding, so the CV-VAE variants and the
image VAE share one definition and one parameter naming:

  encoder: conv_in, down_{i}/res_{j}, down_{i}/downsample, mid/res_0, mid/attn, mid/res_1, norm_out, conv_out
  decoder: conv_in, mid/res_0, mid/attn, mid/res_1, up_{i}/res_{j}, up_{i}/upsample, norm_out, conv_out

Levels are numbered in execution order: `down_0` sees full resolution, `up_0` is the deepest (first executed)
decoder level.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvvae_jax.models import layers, partitioning, remat as remat_lib
from cvvae_jax.models.distributions import DiagonalGaussian

Array = jax.Array
Remat = bool | str  # a policy of `remat.py` ("none", "blocks", "full", "full_save_convs", "full_halves"; True / False:
#                      blocks / none)
Sharding = partitioning.ActivationSharding | None  # where activations live on the mesh (None: no constraint)


class Level(nn.Module):
  """One resolution level: `num_blocks` res blocks to `channels`, then an optional down/upsampler.

  `resample` is None for no resampler, else whether the resampler also acts on time.
  """

  channels: int
  num_blocks: int
  direction: str  # "down" | "up"
  resample: bool | None
  remat: Remat
  block_kw: dict
  upsample_impl: str = "auto"
  activation_sharding: Sharding = None

  @nn.compact
  def __call__(self, h: Array) -> Array:
    constrain = lambda a: partitioning.constrain(a, self.activation_sharding)
    res_cls = remat_lib.module(layers.ResBlock, self.remat, "res")
    for j in range(self.num_blocks):
      h = constrain(res_cls(self.channels, name=f"res_{j}", **self.block_kw)(h))
    if self.resample is None:
      return h
    kw = {k: self.block_kw[k] for k in ("dtype", "param_dtype", "precision", "conv_impl", "activation_sharding")}
    if self.direction == "down":
      down_cls = remat_lib.module(layers.Downsample, self.remat, "resample")
      return constrain(down_cls(self.block_kw["style"], self.resample, name="downsample", **kw)(h))
    up_cls = remat_lib.module(layers.Upsample, self.remat, "resample")
    return constrain(up_cls(self.block_kw["style"], self.resample, upsample_impl=self.upsample_impl, name="upsample",
                            **kw)(h))


class MidBlock(nn.Module):
  """res_0 -> attention (spatial, plus temporal when asked) -> res_1, at constant channels."""

  temporal_attention: bool
  remat: Remat
  block_kw: dict
  activation_sharding: Sharding = None

  @nn.compact
  def __call__(self, h: Array) -> Array:
    sharding = self.activation_sharding
    res_cls = remat_lib.module(layers.ResBlock, self.remat, "res")
    kw = self.block_kw
    h = partitioning.constrain(res_cls(h.shape[-1], name="res_0", **kw)(h), sharding)
    # Attention over every latent pixel of a frame: left height-split, or gathered first (`partitioning.py`).
    gather = sharding is not None and sharding.gather_attention
    h = partitioning.constrain(h, sharding, split_height=not gather)
    attention_cls = remat_lib.module(layers.MidAttention, self.remat, "attention")
    h = attention_cls(self.temporal_attention, kw["num_groups"], kw["epsilon"], kw["dtype"], kw["param_dtype"],
                      kw["activation_sharding"], name="attn")(h)
    h = partitioning.constrain(h, sharding)
    return partitioning.constrain(res_cls(h.shape[-1], name="res_1", **kw)(h), sharding)


def _shared(default=dataclasses.MISSING):
  """A field subclasses share (keyword-only, so that each subclass keeps its own positional fields)."""
  return dataclasses.field(default=default, kw_only=True)


class Tower(nn.Module):
  """The fields `Encoder` and `Decoder` share (keyword-only), and the keyword arguments they hand their layers.

  Attributes:
    block_out_channels: channels of each level (SD: 128, 256, 512, 512).
    layers_per_block: res blocks per level (SD: 2 in the encoder, 3 in the decoder).
    style: padding/dimensionality, see `layers.ConvStyle`.
    half_3d: "2D+3D" res blocks (conv2 per frame) rather than all-3D.
    conv_impl, upsample_impl: how convolutions and upsampling convolutions are computed (`conv_impl.py`).
    activation_sharding: the mesh axes of the batch and height of every level's activations
      (`partitioning.ActivationSharding`; None: no constraint).
  """

  block_out_channels: tuple[int, ...] = _shared()
  layers_per_block: int = _shared()
  style: layers.ConvStyle = _shared()
  half_3d: bool = _shared(True)
  num_groups: int = _shared(32)
  epsilon: float = _shared(1e-6)
  dtype: Any = _shared(jnp.float32)
  param_dtype: Any = _shared(jnp.float32)
  precision: Any = _shared(None)
  remat: Remat = _shared("none")
  conv_impl: str = _shared("auto")
  upsample_impl: str = _shared("auto")
  activation_sharding: Sharding = _shared(None)

  def _constrain(self, h: Array) -> Array:
    return partitioning.constrain(h, self.activation_sharding)

  def _conv_kw(self) -> dict:
    """conv_in / conv_out: the main kernel (3x3x3 or 3x3) with the style's 'same' padding."""
    return dict(kernel_size=(3, 3, 3) if self.style.video else (3, 3), padding=self.style.main_padding(),
                dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv_impl=self.conv_impl,
                activation_sharding=self.activation_sharding)

  def _block_kw(self) -> dict:
    return dict(style=self.style, half_3d=self.half_3d, num_groups=self.num_groups, epsilon=self.epsilon,
                dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv_impl=self.conv_impl,
                remat=self.remat, activation_sharding=self.activation_sharding)

  def _resample(self, i: int, temporal: tuple[bool, ...]) -> bool | None:
    """The resampler after level `i`: None after the last level, else whether it also acts on time."""
    if i == len(self.block_out_channels) - 1:
      return None
    return bool(temporal[i]) if self.style.video else False

  def _norm_out(self, h: Array) -> Array:
    """GroupNorm + SiLU before conv_out (recomputed as one unit under the `full` policies)."""
    def norm_act(mdl: Tower, h: Array) -> Array:
      return nn.silu(layers.GroupNorm(mdl.num_groups, mdl.epsilon, mdl.param_dtype, name="norm_out")(h))
    return remat_lib.function(norm_act, self.remat, "norm_out")(self, h)


class Encoder(Tower):
  """`[B, T, H, W, 3]` (or `[B, H, W, 3]`) -> moments `[B, T', H/2^(L-1), W/2^(L-1), 2 * latent_channels]`.

  Attributes (besides `Tower`'s):
    latent_channels: C of the latent; the encoder outputs 2C (mean and log-variance).
    temporal_downsample: per downsampler (levels 0..L-2), whether it also halves time (video only).
  """

  latent_channels: int
  temporal_downsample: tuple[bool, ...] = ()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    block_kw = self._block_kw()
    sharding = self.activation_sharding
    x = self._constrain(x.astype(self.dtype))
    h = self._constrain(layers.Conv(self.block_out_channels[0], name="conv_in", **self._conv_kw())(x))
    for i, channels in enumerate(self.block_out_channels):
      resample = self._resample(i, self.temporal_downsample)
      h = Level(channels, self.layers_per_block, "down", resample, self.remat, block_kw,
                activation_sharding=sharding, name=f"down_{i}")(h)
    h = self._constrain(self._norm_out(MidBlock(False, self.remat, block_kw, sharding, name="mid")(h)))
    h = self._constrain(layers.Conv(2 * self.latent_channels, name="conv_out", **self._conv_kw())(h))
    return h.astype(jnp.float32)


class Decoder(Tower):
  """Latent `[B, T', h, w, C]` (or `[B, h, w, C]`) -> `[B, T, h * 2^(L-1), w * 2^(L-1), out_channels]`.

  Attributes (besides `Tower`'s; `layers_per_block` counts the decoder's res blocks per level, SD: 3):
    out_channels: channels of the output (3, RGB).
    temporal_upsample: per upsampler in execution order, whether it also doubles time (video only).
    temporal_attention: the SD2.1 variant's temporal attention after the mid spatial attention.
  """

  out_channels: int
  temporal_upsample: tuple[bool, ...] = ()
  temporal_attention: bool = False

  @nn.compact
  def __call__(self, z: Array) -> Array:
    block_kw = self._block_kw()
    channels = tuple(reversed(self.block_out_channels))
    sharding = self.activation_sharding
    h = self._constrain(layers.Conv(channels[0], name="conv_in", **self._conv_kw())(
        self._constrain(z.astype(self.dtype))))
    h = MidBlock(self.temporal_attention and self.style.video, self.remat, block_kw, sharding, name="mid")(h)
    for i, c in enumerate(channels):
      h = Level(c, self.layers_per_block, "up", self._resample(i, self.temporal_upsample), self.remat, block_kw,
                self.upsample_impl, sharding, name=f"up_{i}")(h)
    h = self._constrain(self._norm_out(h))
    # The input of the last layer, for the adaptive GAN weight (gradients at conv_out's kernel).
    self.sow("intermediates", "conv_out_input", h)
    h = self._constrain(layers.Conv(self.out_channels, name="conv_out", **self._conv_kw())(h))
    return h.astype(jnp.float32)


class Autoencoder(nn.Module):
  """What `CVVAE` and `ImageVAE` share besides their encoder and decoder: the latent scaling of diffusion models,
  the run-time fields (keyword-only) and the reconstruction pass. Subclasses define `encode`, `decode` and
  `block_out_channels`.

  Attributes:
    scaling_factor, shift_factor: the diffusion convention `(z - shift_factor) * scaling_factor`.
    dtype: compute dtype (float32 or bfloat16); param_dtype: of the params (float32); precision: of the convs.
    remat: the rematerialization policy (`remat.py`): "none", "blocks" (per res block), "full", "full_save_convs",
      "full_halves".
    conv_impl: the convolution algorithm, `conv_impl.ConvImpl` by name ("auto": `xla` on TPU/GPU, the CPU forms on
      CPU); upsample_impl: the upsampling convolution's, `UpsampleImpl` ("auto": `subpixel` on CPU, else `xla`).
    activation_sharding: where activations live on a mesh (`partitioning.ActivationSharding`: batch and height
      split; the trainer's `mesh.spatial`), None: no constraint.
  """

  scaling_factor: float = _shared(0.18215)
  shift_factor: float = _shared(0.0)
  dtype: Any = _shared(jnp.float32)
  param_dtype: Any = _shared(jnp.float32)
  precision: Any = _shared(None)
  remat: Remat = _shared("none")
  conv_impl: str = _shared("auto")
  upsample_impl: str = _shared("auto")
  activation_sharding: Sharding = _shared(None)

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def __call__(self, x: Array, sample_rng: Array | None = None) -> tuple[Array, DiagonalGaussian]:
    """Reconstruction: encode, take the posterior mode (or a sample when `sample_rng` is given), decode."""
    posterior = self.encode(x)
    z = posterior.mode() if sample_rng is None else posterior.sample(sample_rng)
    return self.decode(z), posterior

  def scale_latent(self, z: Array) -> Array:
    """Raw latent -> the diffusion model's latent: (z - shift_factor) * scaling_factor."""
    return (z - self.shift_factor) * self.scaling_factor

  def unscale_latent(self, z: Array) -> Array:
    """Inverse of `scale_latent`."""
    return z / self.scaling_factor + self.shift_factor
