"""The models of an evaluation: the model, the baseline and the frozen image VAE, loaded and checked as a pair."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from cvvae_jax import paths
from cvvae_jax.eval.config import NONE, EvalConfig, EvaluationError
from cvvae_jax.models import registry
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.weights import pretrained, workdir


@dataclasses.dataclass
class Entry:
  """A loaded model under one role ("model", "baseline" or "image_vae")."""

  role: str
  path: str
  model: Any  # CVVAE | ImageVAE
  params: Any

  @property
  def is_video(self) -> bool:
    return isinstance(self.model, CVVAE)

  @property
  def frame_compression(self) -> int:
    return self.model.temporal_compression if self.is_video else 1

  def describe(self) -> dict[str, Any]:
    enc, dec = parameter_counts(self.params)
    return {"path": self.path, "class": type(self.model).__name__, "spec": registry.model_spec(self.model),
            "latent_channels": int(self.model.latent_channels),
            "spatial_compression": int(self.model.spatial_compression),
            "frame_compression": self.frame_compression, "scaling_factor": float(self.model.scaling_factor),
            "shift_factor": float(self.model.shift_factor), "params_encoder": enc, "params_decoder": dec}

  def label(self) -> str:
    kind = f"CV-VAE {self.model.variant}" if self.is_video else "image VAE"
    return f"{self.role}: {kind} ({os.path.basename(os.path.normpath(self.path))})"


def parameter_counts(params: Mapping[str, Any]) -> tuple[int, int]:
  """(encoder, decoder) parameter counts; quant_conv counts with the encoder, post_quant_conv with the decoder."""
  def count(tree):
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))
  enc = sum(count(params[k]) for k in ("encoder", "quant_conv") if k in params)
  dec = sum(count(params[k]) for k in ("decoder", "post_quant_conv") if k in params)
  return enc, dec


def _load(role: str, path: str, dtype: str, conv_impl: str = "auto") -> Entry:
  try:
    model, params = pretrained.load_pretrained(path)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise EvaluationError(f"--{role} {path}: cannot load the model: {e}") from e
  model = registry.with_conv_impl(registry.with_dtype(model, dtype), conv_impl)
  return Entry(role=role, path=paths.normalize(path), model=model, params=params)


def recorded_image_vae(path: str) -> str:
  """The `image_vae.path` a training workdir's latest checkpoint was trained with ("" if none)."""
  meta = workdir.read_meta(path) or {}
  section = (meta.get("config") or {}).get("image_vae") or {}
  return str(section.get("path") or "")


@dataclasses.dataclass
class Models:
  """The loaded models: `entries` by key (distinct paths only; the image VAE may alias the model or baseline),
  and the compatibility pair as keys into `entries` (None when off, with `compat_note` saying why)."""

  entries: dict[str, Entry]
  baseline: Optional[str]
  cv_key: Optional[str] = None
  image_key: Optional[str] = None
  compat_note: str = ""
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def compat(self) -> bool:
    return self.cv_key is not None and self.image_key is not None

  def recon_keys(self) -> list[str]:
    """Keys whose reconstruction is scored: model, baseline, and the image VAE (reference) when distinct."""
    return list(self.entries)


def load_models(cfg: EvalConfig) -> Models:
  """Loads model, baseline and image VAE and picks the compatibility pair; raises EvaluationError on misfits."""
  entries = {"model": _load("model", cfg.model, cfg.dtype, cfg.conv_impl)}
  if cfg.baseline:
    entries["baseline"] = _load("baseline", cfg.baseline, cfg.dtype, cfg.conv_impl)
  models = Models(entries=entries, baseline="baseline" if cfg.baseline else None)

  cv_key = next((k for k in ("model", "baseline") if k in entries and entries[k].is_video), None)
  if cfg.image_vae.lower() == NONE:
    models.compat_note = "off (--image_vae none)"
    return models
  if cfg.image_vae:  # explicit: must fit, or it is an error
    same = [k for k, e in entries.items() if e.path == paths.normalize(cfg.image_vae)]
    image_key = same[0] if same else "image_vae"
    if not same:
      entries["image_vae"] = _load("image_vae", cfg.image_vae, cfg.dtype, cfg.conv_impl)
    source = "--image_vae"
    if entries[image_key].is_video:
      raise EvaluationError(f"--image_vae {cfg.image_vae}: expected an image VAE (the frozen SD image decoder), got "
                            f"a CV-VAE")
    if cv_key is None:
      raise EvaluationError(f"--image_vae {cfg.image_vae}: the compatibility metrics need a CV-VAE as --model or "
                            f"--baseline, got image VAEs only; drop --image_vae")
  else:  # auto: the image VAE among model/baseline, else the one a training workdir recorded
    image_key = next((k for k in ("baseline", "model") if k in entries and not entries[k].is_video), None)
    source = f"--{image_key}"
    if image_key is None and cv_key is not None:
      recorded = recorded_image_vae(entries[cv_key].path)
      if recorded and paths.path(recorded).exists():
        entries["image_vae"] = _load("image_vae", recorded, cfg.dtype, cfg.conv_impl)
        image_key, source = "image_vae", f"image_vae.path recorded in {entries[cv_key].path}"
      elif recorded:
        models.compat_note = (f"off: the image VAE recorded in {entries[cv_key].path} ({recorded}) does not exist; "
                              f"pass --image_vae")
        return models
    if cv_key is None or image_key is None:
      models.compat_note = "off: needs a CV-VAE and an image VAE (as --model/--baseline, or --image_vae)"
      return models
  cv, img = entries[cv_key], entries[image_key]
  if cv.model.latent_channels != img.model.latent_channels:
    raise EvaluationError(
        f"compatibility: the CV-VAE {cv.path} makes {cv.model.latent_channels}-channel latents, but the image VAE "
        f"{img.path} (from {source}) decodes {img.model.latent_channels}-channel latents; expected a matching pair "
        f"(SD2.1 variant with an SD2.1 image VAE: 4 channels; SD3: 16). Pass a matching --image_vae, or "
        f"--image_vae none to skip the compatibility metrics")
  if cv.model.spatial_compression != img.model.spatial_compression:
    raise EvaluationError(
        f"compatibility: the CV-VAE {cv.path} compresses space {cv.model.spatial_compression}x, the image VAE "
        f"{img.path} {img.model.spatial_compression}x; expected equal")
  if (cv.model.scaling_factor, cv.model.shift_factor) != (img.model.scaling_factor, img.model.shift_factor):
    models.notes.append(
        f"scaling factors differ: CV-VAE (scale {cv.model.scaling_factor}, shift {cv.model.shift_factor}) vs image "
        f"VAE (scale {img.model.scaling_factor}, shift {img.model.shift_factor}); latents are crossed in raw form")
  models.cv_key, models.image_key = cv_key, image_key
  models.compat_note = f"on: CV-VAE = {cv_key}, image VAE = {image_key} (from {source})"
  return models
