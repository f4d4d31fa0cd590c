"""The clips of an evaluation: `--data` read as the embedded set, a folder or a TFDS name, and checked against the
models before any work."""
from __future__ import annotations

import jax

from cvvae_jax import metrics
from cvvae_jax.data import config as data_config_lib
from cvvae_jax.data import sources
from cvvae_jax.data.sources import DataSpec
from cvvae_jax.eval.config import EvalConfig, EvaluationError
from cvvae_jax.eval.models import Models
from cvvae_jax.models import lpips


def resolve_data(cfg: EvalConfig) -> DataSpec:
  """Reads `cfg.data` as the embedded set, a folder or a TFDS name, and picks video or image (before any work)."""
  try:
    return sources.describe_data(cfg.data, kind=cfg.data_kind, data_dir=cfg.data_dir, split=cfg.split,
                                 data_key=cfg.data_key)
  except ValueError as e:
    raise EvaluationError(str(e)) from None


def data_config(cfg: EvalConfig, spec: DataSpec):
  """The data config (`data/config.py`) whose `eval` section reads `spec`, this process's share of each batch."""
  c = data_config_lib.get_config("full")
  c.embedded_dir = cfg.embedded_dir
  h, w = cfg.resolution
  video = spec.kind == "video"
  c.eval.update(dict(kind=spec.kind, source=spec.source, path=spec.path, tfds_name=spec.tfds_name,
                     split=spec.split, data_dir=spec.data_dir, data_key=spec.data_key,
                     frames=int(cfg.frames) if video else 1, stride=int(cfg.stride) if video else 1,
                     size=(h, w), short_side=min(h, w), batch_size=int(cfg.batch_size) // jax.process_count()))
  return c


def check_setup(cfg: EvalConfig, models: Models, spec: DataSpec) -> None:
  """Raises EvaluationError when the models cannot take the clips (frames, resolution) or the metrics cannot."""
  h, w = cfg.resolution
  problems = []
  frames = cfg.frames if spec.kind == "video" else 1
  for e in models.entries.values():
    sc = e.model.spatial_compression
    if h % sc or w % sc:
      problems.append(f"--{e.role} ({e.path}) compresses space {sc}x: expected a resolution in multiples of {sc}, "
                      f"got {h}x{w}")
    if e.is_video and (frames - 1) % e.model.temporal_compression:
      tc = e.model.temporal_compression
      problems.append(f"--{e.role} ({e.path}) is a CV-VAE: expected --frames = 1 + {tc}k (e.g. "
                      f"{1 + tc * max(1, (frames - 1) // tc)}), got {frames}")
  need = max(metrics.SSIM_WINDOW, lpips.MIN_SIZE[cfg.lpips_net] if cfg.lpips else 0)
  if min(h, w) < need:
    problems.append(f"resolution: expected H, W >= {need} (SSIM window{', LPIPS pooling' if cfg.lpips else ''}), "
                    f"got {h}x{w}")
  if problems:
    raise EvaluationError("cannot evaluate these models on this data:\n  " + "\n  ".join(problems))
