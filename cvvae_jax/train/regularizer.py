"""Latent regularization of CV-VAE: the decoder-side and encoder-side image-VAE regularizers.

CV-VAE keeps its video latents compatible with the frozen SD image VAE (notes, "Training objective"):

* **decoder side** (`decoder_regularization`, the default, weight l1 = 1): the frozen image decoder decodes
  every latent frame of the (sampled) video latent as an image; each decoded image is compared (L1, with a
  learned scalar `logvar_2d`) with the frame psi(x) it stands for. Gradients flow through the frozen
  decoder into the video encoder.
* **encoder side** (`encoder_regularization_latent`, an ablation, weight l2 = 0): the frozen image encoder
  encodes psi(x); the video decoder must reconstruct the whole clip from that latent. This module only
  builds the latent; the train step decodes it and applies `losses.reconstruction_nll`.

psi (`models/psi.py`) maps a clip of T = 1 + 4k frames to the 1 + k frames the latent frames stand for.

All functions are pure and jit-able; shapes are static, the random choice uses `jax.random`.
Everything here is channels-last: video `[B, T, H, W, C]` in [-1, 1], latents `[B, 1+k, h, w, C]`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import einops
import jax
import jax.numpy as jnp

from cvvae_jax.models import psi as psi_lib
from cvvae_jax.models.psi import TEMPORAL_COMPRESSION, PsiMapping, psi


class RegularizationAux(NamedTuple):
  """What `decoder_regularization` returns beside the loss (a pytree, fine under jit).

  metrics: scalars `reg_decoder/l1` (mean |psi(x) - decoded| per element), `reg_decoder/nll` (the loss),
      `reg_decoder/logvar_2d`.
  decoded: the image decoder's output `[B, L, H, W, 3]` (L = 1+k, or 1 for FIRST), e.g. for image logs.
  targets: psi(x), `[B, L, H, W, 3]`.
  """

  metrics: dict
  decoded: jax.Array
  targets: jax.Array


def decoder_regularization(
  latent: jax.Array,
  target_video: jax.Array,
  image_decode: Callable[[jax.Array], jax.Array],
  mapping: PsiMapping,
  rng: Optional[jax.Array],
  logvar_2d: jax.Array,
  *,
  temporal_compression: int = TEMPORAL_COMPRESSION,
) -> tuple[jax.Array, RegularizationAux]:
  """Decoder-side latent regularization (the paper's default).

  The frozen image decoder decodes each latent frame as an image; the L1 distance to psi(x) is turned
  into a Laplace-style NLL with the learned scalar `logvar_2d`:

    loss = sum_{n, h, w, c} (|psi(x) - D(z)| / exp(logvar_2d) + logvar_2d) / N

  where N = B * L is the number of compared frames (L = 1+k, or 1 for FIRST): the sum runs over
  pixels and channels, the mean over frames. This is the original's reduction
  (`torch.sum(rec2d_loss) / rec2d_loss.shape[0]` on `(b t) c h w`); the released weight 1.0 (l1) is
  set relative to it. No perceptual term, as in the original.

  Args:
      latent: `[B, 1+k, h, w, Cz]`, the (sampled) video latent, unscaled, as the video encoder gives it.
    Gradients flow through `image_decode` into it.
      target_video: the input clip `[B, 1+4k, H, W, 3]` in [-1, 1].
      image_decode: the frozen image decoder, latents `[N, h, w, Cz]` -> images `[N, H, W, 3]`. Close over
    its parameters and do not differentiate them (they have no optimizer state, see `optim.py`).
      mapping: the psi mapping; for FIRST only latent frame 0 is decoded and compared with frame 0.
      rng: PRNG key for RANDOM (None otherwise).
      logvar_2d: learned scalar log-variance (init 0.0), trained with the generator.

  Returns:
      `(loss, aux)`: scalar float32 loss and a `RegularizationAux`.
  """
  mapping = psi_lib.check_mapping(mapping)
  k = psi_lib.frame_groups(target_video, temporal_compression, "target_video")
  if latent.ndim != 5 or latent.shape[1] != 1 + k or latent.shape[0] != target_video.shape[0]:
    raise ValueError(
      f"expected latent of shape [B={target_video.shape[0]}, 1+k={1 + k}, h, w, C] for a "
      f"target_video of shape {tuple(target_video.shape)}, got {tuple(latent.shape)}"
    )
  targets = psi(target_video, mapping, rng, temporal_compression=temporal_compression)
  if mapping is PsiMapping.FIRST:
    latent = latent[:, :1]
  b, length = latent.shape[:2]
  decoded = image_decode(einops.rearrange(latent, "b l h w c -> (b l) h w c"))
  expected = (b * length,) + tuple(targets.shape[2:])
  if tuple(decoded.shape) != expected:
    raise ValueError(
      f"expected image_decode to return images of shape {expected}, got {tuple(decoded.shape)}"
    )
  decoded = decoded.reshape(targets.shape)
  loss, metrics = _frame_l1_nll(targets, decoded, logvar_2d)
  metrics = {
    "reg_decoder/l1": metrics["l1"],
    "reg_decoder/nll": loss,
    "reg_decoder/logvar_2d": metrics["logvar"],
  }
  return loss, RegularizationAux(metrics=metrics, decoded=decoded, targets=targets)


def _frame_l1_nll(targets: jax.Array, outputs: jax.Array, logvar: jax.Array) -> tuple[jax.Array, dict]:
  """sum(|t - o| / exp(logvar) + logvar) / number of frames, in float32. Inputs `[..., H, W, C]`."""
  targets = targets.astype(jnp.float32)
  outputs = outputs.astype(jnp.float32)
  logvar = jnp.asarray(logvar, jnp.float32)
  num_frames = targets.size // (targets.shape[-3] * targets.shape[-2] * targets.shape[-1])
  l1 = jnp.abs(targets - outputs)
  loss = jnp.sum(l1 / jnp.exp(logvar) + logvar) / num_frames
  return loss, {"l1": jnp.mean(l1), "logvar": logvar}


def encoder_regularization_latent(
  target_video: jax.Array,
  image_encode: Callable[[jax.Array], jax.Array],
  mapping: PsiMapping,
  rng: Optional[jax.Array],
  *,
  temporal_compression: int = TEMPORAL_COMPRESSION,
) -> jax.Array:
  """Encoder-side regularization (ablation): the latent the video decoder must rebuild the clip from.

  The frozen image encoder encodes each target frame psi(x) as an image; the stacked latents are what the
  video decoder decodes, and the train step compares that decode with the full clip using
  `losses.reconstruction_nll` (same `logvar`), weighted by l2 (`LossWeights.reg_encoder_weight`).

  Differences from the original (`AutoencodingEngineWithEncoderConstraint`), whose loss path crashes
  (it logs a `logvar_2d` its loss class never defines): the original always uses SLICE, passes the image
  encoder's moments through the same posterior sampler (adding their constant KL), and concatenates
  this batch to the main one, so its reconstruction loss is the mean of both halves (an effective weight
  of 0.5 on each) and the GAN sees both. Here the term stands alone with its own weight l2.

  Args:
      target_video: `[B, 1+4k, H, W, 3]` in [-1, 1].
      image_encode: the frozen image encoder, images `[N, H, W, 3]` -> latents `[N, h, w, Cz]` (the caller
    decides mode or sample, and any scaling, so that the latent is in the video decoder's space).
      mapping: RANDOM, SLICE or MEAN. FIRST is rejected: a one-frame latent decodes to one frame, not the
    clip.
      rng: PRNG key for RANDOM (None otherwise).

  Returns:
      `[B, 1+k, h, w, Cz]`, with gradients stopped (the image encoder is frozen, as `torch.no_grad()` in
      the original).
  """
  mapping = psi_lib.check_mapping(mapping)
  if mapping is PsiMapping.FIRST:
    raise ValueError(
      "expected psi mapping RANDOM, SLICE or MEAN for encoder-side regularization (the latent must "
      "stand for the whole clip), got PsiMapping.FIRST"
    )
  targets = psi(target_video, mapping, rng, temporal_compression=temporal_compression)
  b, length = targets.shape[:2]
  latent = image_encode(einops.rearrange(targets, "b l h w c -> (b l) h w c"))
  if latent.ndim != 4 or latent.shape[0] != b * length:
    raise ValueError(
      f"expected image_encode to return latents of shape [{b * length}, h, w, C], "
      f"got {tuple(latent.shape)}"
    )
  latent = einops.rearrange(latent, "(b l) h w c -> b l h w c", b=b)
  return jax.lax.stop_gradient(latent)
