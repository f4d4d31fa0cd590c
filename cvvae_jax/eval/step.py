"""The evaluation step: every decode, every per-frame score and every feature of one batch, in one function."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cvvae_jax import metrics
from cvvae_jax.eval.config import LPIPS_FRAMES_PER_CALL, EvalConfig
from cvvae_jax.eval.models import Models
from cvvae_jax.inference import api
from cvvae_jax.models import i3d, lpips
from cvvae_jax.models.psi import TEMPORAL_COMPRESSION, PsiMapping, psi


def frame_metrics(x: jax.Array, y: jax.Array, lpips_params: Optional[Mapping[str, Any]] = None,
                  *, clip: bool = True, frames_per_call: Optional[int] = None) -> dict[str, jax.Array]:
  """PSNR, SSIM and (given LPIPS parameters) LPIPS per frame of two videos; jittable.

  Args:
    x, y: reference and reconstruction, videos ``[B, T, H, W, 3]`` in [-1, 1].
    lpips_params: from :func:`cvvae_jax.models.lpips.load_lpips_params`; ``None`` skips LPIPS.
    clip: clip both to [-1, 1] first (as PSNR/SSIM do; LPIPS then sees the clipped frames too).
    frames_per_call: LPIPS frames per VGG pass (`lpips_distance_video`; None: all at once).

  Returns:
    ``{"psnr": [B, T], "ssim": [B, T], "lpips": [B, T]}`` float32 (``lpips`` only with parameters).
  """
  if x.ndim != 5:
    raise ValueError(f"expected videos [B, T, H, W, C], got shape {tuple(x.shape)}")
  out = {"psnr": metrics.psnr(x, y, clip=clip), "ssim": metrics.ssim(x, y, clip=clip)}
  if lpips_params is not None:
    if clip:
      x, y = jnp.clip(x, -1.0, 1.0), jnp.clip(y, -1.0, 1.0)
    out["lpips"] = lpips.lpips_distance_video(lpips_params, x, y, frames_per_call=frames_per_call)
  return out


def compat_targets(video: jax.Array, mapping: PsiMapping) -> jax.Array:
  """The frames each latent frame stands for: psi(video) `[B, 1+k, H, W, 3]` (FIRST: `[B, 1, H, W, 3]`)."""
  return psi(video, mapping)


def align_compat(decoded: jax.Array, video: jax.Array, mapping: PsiMapping) -> tuple[jax.Array, jax.Array]:
  """Pairs the image decoder's output for each CV-VAE latent frame with its psi target.

  Args:
    decoded: `[B, 1+k, H, W, 3]`, latent frame i decoded as an image.
    video: the clip `[B, 1+4k, H, W, 3]`.
    mapping: SLICE (target frame 4i), MEAN (mean of frames 4i-3 .. 4i; frame 0 for i = 0) or FIRST (latent 0 and
      frame 0 only).
  Returns:
    `(targets, outputs)`, both `[B, L, H, W, 3]` with L = 1 + k (FIRST: 1).
  """
  targets = compat_targets(video, mapping)
  if decoded.shape[:2] != (video.shape[0], 1 + (video.shape[1] - 1) // TEMPORAL_COMPRESSION):
    raise ValueError(f"expected decoded latent frames [B, 1+k, H, W, 3] for a video of shape {tuple(video.shape)}, "
                     f"got {tuple(decoded.shape)}")
  return targets, decoded[:, :targets.shape[1]]


def score_pairs(pairs: Mapping[str, tuple[jax.Array, jax.Array]], lpips_params: Optional[Mapping[str, Any]],
                frames_per_call: int = LPIPS_FRAMES_PER_CALL) -> dict[str, dict[str, jax.Array]]:
  """Per-frame PSNR/SSIM(/LPIPS) of named (reference, output) video pairs, in one batch of frames; jittable.

  Args:
    pairs: name -> (reference `[B, T_n, H, W, 3]`, output `[B, T_n, H, W, 3]`), in [-1, 1]; outputs are clipped.
    lpips_params: `lpips.load_lpips_params()`, or None to skip LPIPS.
  Returns:
    name -> {"psnr": [B, T_n], "ssim": [B, T_n], ("lpips": [B, T_n])}, float32.
  """
  names = list(pairs)
  sizes = [pairs[n][0].shape[1] for n in names]
  ref = jnp.concatenate([pairs[n][0].astype(jnp.float32) for n in names], axis=1)
  out = jnp.concatenate([pairs[n][1].astype(jnp.float32) for n in names], axis=1)
  n = ref.shape[0] * ref.shape[1]
  per_call = max(d for d in range(1, min(frames_per_call, n) + 1) if n % d == 0)
  scores = frame_metrics(ref, out, lpips_params, frames_per_call=per_call)
  splits = np.cumsum(sizes)[:-1].tolist()
  result = {n: {} for n in names}
  for metric, value in scores.items():
    for name, part in zip(names, jnp.split(value, splits, axis=1)):
      result[name][metric] = part
  return result


def series_names(models: Models, compat_psi: Sequence[str]) -> list[str]:
  """Names of the scored series: `recon/<key>` per model, then the compatibility series."""
  names = [f"recon/{k}" for k in models.recon_keys()]
  if models.compat:
    names += [f"compat/cv_latent_image_decoder/{p}" for p in compat_psi]
    names += ["compat/image_latent_cv_decoder"]
  return names


def group_offset_psnr(crossed: jax.Array, video: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """Where in its 4-frame group a latent is most compatible: PSNR of the image decoder on latent i >= 1 against
  each frame 4(i-1) + j of its group, j = 1..4 (the last frame, j = 4, is psi's `slice` target).

  `crossed [B, 1+k, H, W, 3]` (the image decoder on each latent frame), `video [B, 1+4k, H, W, 3]` ->
  `{"compat/group_offset/<j>": {"psnr": [B, k]}}` (nothing for k = 0).
  """
  k = crossed.shape[1] - 1
  n = TEMPORAL_COMPRESSION
  return {f"compat/group_offset/{j}": {"psnr": metrics.psnr(video[:, j:n * k + 1:n], crossed[:, 1:])}
          for j in range(1, n + 1) if k > 0}


def make_step(models: Models, cfg: EvalConfig) -> Callable:
  """The step `(params, frozen, video) -> (scores, extras, pictures)`, pure (`run.py` jits it over the devices).

  `params` maps each key of `models.entries` to its params, `frozen` holds the metric networks ("lpips" when
  LPIPS is on); `video` is `[B, T, H, W, 3]` in [-1, 1].
  - `scores[name][metric]` is `[B, T_name]` (see `series_names`), plus the psnr of `group_offset_psnr`;
  - `extras`: the raw latents the compatibility statistics compare: "latents/cv" (the CV-VAE's posterior mean
    `[B, 1+k, h, w, C]`) and "latents/image" (the image VAE's of every frame `[B, T, h, w, C]`);
  - `pictures`: the decoded videos of the sample strips, `recon/<key>` `[B, T, H, W, 3]`,
    `compat/cv_latent_image_decoder` `[B, 1+k, H, W, 3]` and `compat/image_latent_cv_decoder` `[B, T, H, W, 3]`.
  """
  tiling = cfg.tiling_config()
  psis = [PsiMapping.parse(p) for p in cfg.compat_psi]

  def encode(key, params, video):  # raw posterior mean
    e = models.entries[key]
    return api.encode_posterior(e.model, params[key], video, tiling=tiling, image_mode=not e.is_video).mean

  def decode(key, params, z, image_mode):  # raw latent -> frames
    e = models.entries[key]
    return api.decode(e.model, params[key], e.model.scale_latent(z), tiling=tiling,
                      image_mode=image_mode or not e.is_video)

  def step(params, frozen, video):
    latents, pictures, pairs, extras = {}, {}, {}, {}
    for key in models.recon_keys():
      latents[key] = encode(key, params, video)
      pictures[f"recon/{key}"] = decode(key, params, latents[key], image_mode=False)
      pairs[f"recon/{key}"] = (video, pictures[f"recon/{key}"])
    offsets = {}
    if models.compat:
      cv, img = models.cv_key, models.image_key
      crossed = decode(img, params, latents[cv], image_mode=True)  # [B, 1+k, H, W, 3]
      pictures["compat/cv_latent_image_decoder"] = crossed
      for mapping in psis:
        pairs[f"compat/cv_latent_image_decoder/{mapping.value}"] = align_compat(crossed, video, mapping)
      back = decode(cv, params, latents[img], image_mode=True)  # [B, T, H, W, 3]
      pictures["compat/image_latent_cv_decoder"] = back
      pairs["compat/image_latent_cv_decoder"] = (video, back)
      offsets = group_offset_psnr(crossed, video)
      extras["latents/cv"], extras["latents/image"] = latents[cv], latents[img]
    return {**score_pairs(pairs, frozen.get("lpips")), **offsets}, extras, pictures

  return step


def make_features(models: Models) -> Callable:
  """The rFVD features of one batch, `(i3d_params, video, pictures) -> {"fvd/input": [B, 400], "fvd/recon/<key>":
  [B, 400]}`: I3D logits of the clips and of each model's reconstruction (`pictures["recon/<key>"]` from the step).

  A program of its own, run after the step on the step's outputs (they stay on the devices): with I3D inside the
  step's program, XLA:CPU 0.10.2 on 8 host devices returned wrong logits for the CV-VAE's reconstructions in some
  runs (a different clip each run; the same values from a separate program and on one device).
  """
  def features(i3d_params, video, pictures):
    logits = lambda clips: i3d.i3d_logits(i3d_params, i3d.preprocess(clips))
    return {"fvd/input": logits(video), **{f"fvd/recon/{k}": logits(pictures[f"recon/{k}"])
                                           for k in models.recon_keys()}}

  return features
