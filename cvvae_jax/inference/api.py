"""The encode/decode API: videos to diffusion latents and back, at any length and frame size.

Pure, jittable functions for JAX diffusion code (latents are *scaled*: `(z - shift_factor) * scaling_factor`):

    from cvvae_jax import inference
    z = inference.encode(vae, params, video)                 # [B, 1+4k, H, W, 3] in [-1, 1] -> [B, 1+k, H/8, W/8, C]
    z = inference.encode(vae, params, video, rng=key)        # a posterior sample instead of the mean
    video = inference.decode(vae, params, z)                 # -> [B, 1+4k, 8h, 8w, 3] (not clipped)
    frames = inference.decode(vae, params, z, image_mode=True)  # each latent frame decoded as an image (1:1 frames)
    step = jax.jit(inference.decode, static_argnames=("model", "tiling", "image_mode", "dtype", "conv_impl"))

`tiling` (a `TilingConfig`, see `plan.py`) switches chunking and tiling: the default (TILED, 17-frame chunks, 576-pixel
tiles) changes nothing for inputs that fit in one chunk and one tile; `TilingConfig(mode="original")` reproduces the
original code's latents, with the tile size, overlap and rounds of the model's own config.json (`original_settings`;
sizes given explicitly win); `TilingConfig(mode="exact")` never splits a video. `dtype=jnp.bfloat16` computes in bf16
with float32 parameters; `conv_impl` ("auto", "xla", "cpu", ...: `models.conv_impl.ConvImpl`) chooses how the
convolutions are computed (None: the model's own field, "auto" unless set). Under a mesh, shard the batch axis of
the input (`jax.jit(..., in_shardings=...)`).

For long or large videos from the host, `encode_streaming` / `decode_streaming` run the same plan chunk by chunk
(numpy in, numpy out, one compilation reused for every video length).

Models: `CVVAE` (video mode: 1+4k frames <-> 1+k latents; image mode: frame by frame) and `ImageVAE` (always frame by
frame; 4D inputs are a batch of images).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvvae_jax.inference import plan as plan_lib
from cvvae_jax.inference import tiling as tiling_lib
from cvvae_jax.inference.plan import TilingConfig
from cvvae_jax.models.distributions import LOGVAR_MAX, LOGVAR_MIN, DiagonalGaussian
from cvvae_jax.models.registry import check_model, with_conv_impl, with_dtype
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE


@dataclasses.dataclass(frozen=True)
class Coder:
  """A model's encoder or decoder as a function of 5D chunks, `fn(params, x)`, with its `Geometry` (hashable).

  Encoders return moments `[..., 2C]` (mean, then log-variance), so that tiles of both are blended alike.
  Video mode (CVVAE): `[B, 1+4m, H, W, 3] <-> [B, 1+m, h, w, C]`. Image mode: every frame on its own,
  `[B, t, H, W, 3] <-> [B, t, h, w, C]`.
  """

  model: nn.Module
  encoder: bool
  image_mode: bool

  def __post_init__(self):
    check_model(self.model)
    if isinstance(self.model, ImageVAE) and not self.image_mode:
      raise ValueError("the image VAE has no video mode; use image_mode=True (frames are coded one by one)")

  @property
  def geometry(self) -> plan_lib.Geometry:
    sc = self.model.spatial_compression
    if self.image_mode:
      return plan_lib.Geometry.image_encoder(sc) if self.encoder else plan_lib.Geometry.image_decoder(sc)
    tc = self.model.temporal_compression
    return plan_lib.Geometry.video_encoder(tc, sc) if self.encoder else plan_lib.Geometry.video_decoder(tc, sc)

  def __call__(self, params, x: jax.Array) -> jax.Array:
    variables = {"params": params}
    if self.image_mode:
      frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
      if isinstance(self.model, CVVAE):
        frames = frames[:, None]  # a 1-frame video
      y = self._run(variables, frames)
      return einops.rearrange(y.reshape(-1, *y.shape[-3:]), "(b t) h w c -> b t h w c", b=x.shape[0])
    return self._run(variables, x)

  def _run(self, variables, x):
    if self.encoder:
      posterior = self.model.apply(variables, x, method="encode")
      return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)
    return self.model.apply(variables, x, method="decode")


def original_settings(model) -> plan_lib.OriginalSettings:
  """How the original code tiles `model`: a CVVAE's `original_*` fields (from its config.json when it was loaded from
  an original folder, from `model.json` for our export); for the image VAE, the released CV-VAE settings."""
  if isinstance(model, CVVAE):
    return plan_lib.OriginalSettings(model.original_tile_size, model.original_tile_overlap,
                                     model.original_round_frames, model.temporal_compression)
  return plan_lib.OriginalSettings()


def _as_5d(x, image_mode: bool, what: str, channels: int):
  """-> (5D array, whether the input was a 4D batch of images)."""
  if x.ndim == 4 and image_mode:
    return x[:, None], True
  if x.ndim != 5:
    raise ValueError(f"expected {what} [B, T, H, W, {channels}]" + (" or [B, H, W, C] in image mode" if image_mode
                                                                      else "") + f", got shape {x.shape}")
  if x.shape[-1] != channels:
    raise ValueError(f"expected {what} with {channels} channels in the last axis, got shape {x.shape}")
  return x, False


def _image_mode(model, image_mode: bool) -> bool:
  return True if isinstance(model, ImageVAE) else image_mode


def _prepare(model, params, x, tiling, image_mode, encoder, dtype, conv_impl):
  check_model(model)
  model = with_conv_impl(with_dtype(model, dtype), conv_impl)
  channels = model.in_channels if encoder else model.latent_channels
  image_mode = _image_mode(model, image_mode) or x.ndim == 4  # a 4D input is a batch of images
  x5, was_4d = _as_5d(x, image_mode, "video" if encoder else "latents", channels)
  coder = Coder(model, encoder, image_mode)
  tiling = (TilingConfig() if tiling is None else tiling).resolve(original_settings(model))
  plan = plan_lib.make_plan(tiling, coder.geometry, x5.shape)
  return coder, plan, x5, was_4d


def encode_posterior(model, params, video, *, tiling: TilingConfig | None = None, image_mode: bool = False,
                     dtype: Any = None, conv_impl: str | None = None) -> DiagonalGaussian:
  """The (unscaled) posterior of a tiled/chunked encode. Pure and jittable (model, tiling, image_mode, dtype and
  conv_impl static).

  Args:
    video: `[B, 1+4k, H, W, 3]` in [-1, 1]; image mode (or the image VAE): `[B, T, H, W, 3]` or images `[B, H, W, 3]`.
  Returns:
    DiagonalGaussian over `[B, 1+k, H/8, W/8, C]` (image mode: `[B, T, h, w, C]`, or `[B, h, w, C]` for 4D input).
  """
  coder, plan, x5, was_4d = _prepare(model, params, video, tiling, image_mode, True, dtype, conv_impl)
  moments = tiling_lib.apply(coder, params, x5, plan, coder.geometry)
  if was_4d:
    moments = moments[:, 0]
  return DiagonalGaussian.from_moments(moments)


def encode(model, params, video, rng: jax.Array | None = None, *, tiling: TilingConfig | None = None,
           image_mode: bool = False, dtype: Any = None, conv_impl: str | None = None) -> jax.Array:
  """Video -> scaled latents `(z - shift) * scale`, z the posterior mean (or a sample when `rng` is given).

  Pure and jittable. Shapes as in `encode_posterior`.
  """
  posterior = encode_posterior(model, params, video, tiling=tiling, image_mode=image_mode, dtype=dtype,
                                 conv_impl=conv_impl)
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return model.scale_latent(z)


def decode(model, params, latents, *, tiling: TilingConfig | None = None, image_mode: bool = False,
           dtype: Any = None, conv_impl: str | None = None) -> jax.Array:
  """Scaled latents -> video in about [-1, 1] (not clipped). Pure and jittable.

  Args:
    latents: video mode `[B, 1+k, h, w, C]` -> `[B, 1+4k, 8h, 8w, 3]`. Image mode (or the image VAE): every latent
      frame decoded as an image, `[B, T, h, w, C]` -> `[B, T, 8h, 8w, 3]`, and a 4D batch `[B, h, w, C]` ->
      `[B, 8h, 8w, 3]` (a 4D input to CV-VAE is always image mode).
  """
  z = model.unscale_latent(jnp.asarray(latents))
  coder, plan, z5, was_4d = _prepare(model, params, z, tiling, image_mode, False, dtype, conv_impl)
  out = tiling_lib.apply(coder, params, z5, plan, coder.geometry)
  return out[:, 0] if was_4d else out


def posterior_streaming(model, params, video, *, tiling: TilingConfig | None = None, image_mode: bool = False,
                        dtype: Any = None, conv_impl: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> DiagonalGaussian:
  """`encode_posterior` chunk by chunk from the host (numpy or jax input; mean/logvar as numpy float32).

  One compilation per chunk shape, reused across chunks and calls (videos of any length at least one chunk long
  share it); memory holds the input, the output and one chunk. `progress(done, total)` is called after every chunk
  (e.g. `tiling.chunk_progress("encode")`).
  """
  coder, plan, x5, was_4d = _prepare(model, params, video, tiling, image_mode, True, dtype, conv_impl)
  moments = tiling_lib.apply_streaming(coder, params, x5, plan, coder.geometry, progress)
  if was_4d:
    moments = moments[:, 0]
  c = moments.shape[-1] // 2
  logvar = np.clip(moments[..., c:], LOGVAR_MIN, LOGVAR_MAX)
  return DiagonalGaussian(mean=moments[..., :c], logvar=logvar)


def encode_streaming(model, params, video, rng: jax.Array | None = None, *, tiling: TilingConfig | None = None,
                     image_mode: bool = False, dtype: Any = None, conv_impl: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """`encode` chunk by chunk from the host: scaled latents as a numpy float32 array."""
  posterior = posterior_streaming(model, params, video, tiling=tiling, image_mode=image_mode, dtype=dtype,
                                  conv_impl=conv_impl, progress=progress)
  z = posterior.mean
  if rng is not None:
    eps = np.asarray(jax.random.normal(rng, z.shape, jnp.float32))
    z = z + np.exp(0.5 * posterior.logvar) * eps
  return np.asarray((z - model.shift_factor) * model.scaling_factor, np.float32)


def decode_streaming(model, params, latents, *, tiling: TilingConfig | None = None, image_mode: bool = False,
                     dtype: Any = None, conv_impl: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """`decode` chunk by chunk from the host: the video as a numpy float32 array (not clipped)."""
  z = np.asarray(latents, np.float32) / model.scaling_factor + model.shift_factor
  coder, plan, z5, was_4d = _prepare(model, params, z, tiling, image_mode, False, dtype, conv_impl)
  out = tiling_lib.apply_streaming(coder, params, z5, plan, coder.geometry, progress)
  return out[:, 0] if was_4d else out


def plan_for(model, shape, *, encoder: bool, tiling: TilingConfig | None = None,
             image_mode: bool = False) -> plan_lib.Plan:
  """The chunks and tiles `encode`/`decode` would use for an input of `shape` (for logging and tests)."""
  check_model(model)
  image_mode = _image_mode(model, image_mode) or len(shape) == 4
  shape = tuple(shape) if len(shape) == 5 else (shape[0], 1, *shape[1:])
  coder = Coder(model, encoder, image_mode)
  tiling = (TilingConfig() if tiling is None else tiling).resolve(original_settings(model))
  return plan_lib.make_plan(tiling, coder.geometry, shape)


# The top-level params each direction reads (CVVAE: encoder / decoder; ImageVAE: plus its quant convs).
_PARTS = {"encode": ("encoder", "quant_conv"), "decode": ("decoder", "post_quant_conv")}


def params_for(params, direction: str):
  """The part of `params` that `direction` ("encode" or "decode") reads, e.g. to hold only the encoder's weights
  while encoding a dataset (for the SD2.1 CV-VAE 262 of its 696 MB; the decoder's 434 MB for decoding).

  The result works with every function here and with `model.apply(..., method="encode" / "decode")`.
  """
  if direction not in _PARTS:
    raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
  main = _PARTS[direction][0]
  if main not in params:
    raise ValueError(f"params have no {main!r} entry (top-level keys: {sorted(params)}): expected the params of a "
                     f"CVVAE or ImageVAE")
  return {k: v for k, v in params.items() if k in _PARTS[direction]}
