"""The clips of an evaluation: `--data` read as the embedded set, a folder or a TFDS name, and checked against the
models before any work."""
from __future__ import annotations

import dataclasses
import os

import jax

from cvvae_jax import metrics, paths
from cvvae_jax.data import config as data_config_lib
from cvvae_jax.data import folders, sources
from cvvae_jax.eval.config import EMBEDDED, EvalConfig, EvaluationError
from cvvae_jax.eval.models import Models
from cvvae_jax.models import lpips


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the evaluation clips come from (fields of the `eval` section of `data/config.py`)."""

  kind: str  # "video" | "image"
  source: str  # "folder" | "tfds" | "embedded"
  path: str = ""
  tfds_name: str = ""
  split: str = ""
  data_dir: str = ""
  data_key: str = "data"

  @property
  def name(self) -> str:
    if self.source == "folder":
      return os.path.basename(os.path.normpath(self.path))
    if self.source == "tfds":
      return f"{self.tfds_name}:{self.split}"
    return f"embedded {self.kind}s"


def resolve_data(cfg: EvalConfig) -> DataSpec:
  """Reads `cfg.data` as the embedded set, a folder or a TFDS name, and picks video or image (before any work)."""
  data = cfg.data
  if data == EMBEDDED or data.startswith(EMBEDDED + ":"):
    kind = data.split(":", 1)[1] if ":" in data else (cfg.data_kind if cfg.data_kind != "auto" else "video")
    if kind not in ("video", "image"):
      raise EvaluationError(f"--data {data}: expected 'embedded', 'embedded:video' or 'embedded:image'")
    return DataSpec(kind=kind, source="embedded")
  if paths.is_remote(data) or os.path.exists(data):
    if not paths.path(data).is_dir():
      raise EvaluationError(f"--data {data}: expected a folder of videos or images (or a TFDS name), got "
                            f"{'a file' if paths.path(data).exists() else 'a path that does not exist'}")
    try:
      kind = folders.folder_kind(data) if cfg.data_kind == "auto" else cfg.data_kind
    except ValueError as e:
      raise EvaluationError(str(e)) from None
    return DataSpec(kind=kind, source="folder", path=paths.normalize(data))
  try:
    builder = sources.prepared_builder(data, cfg.data_dir)
  except FileNotFoundError as e:
    raise EvaluationError(f"--data {data}: not a folder, and not a TFDS dataset ready to read: {e}") from None
  split = cfg.split or sources.default_split(builder)
  features = builder.info.features
  kind = cfg.data_kind if cfg.data_kind != "auto" else ("video" if "num_frames" in features else "image")
  key = cfg.data_key or sources.encoded_feature(features)
  if key not in features:
    raise EvaluationError(f"--data {data}: expected --data_key naming the feature with encoded files, one of "
                          f"{list(features)}")
  return DataSpec(kind=kind, source="tfds", tfds_name=data, split=split, data_dir=cfg.data_dir, data_key=key)


def data_config(cfg: EvalConfig, spec: DataSpec):
  """The data config (`data/config.py`) whose `eval` section reads `spec`, this process's share of each batch."""
  c = data_config_lib.get_config("full")
  c.embedded_dir = cfg.embedded_dir
  h, w = cfg.resolution
  video = spec.kind == "video"
  c.eval.update(dict(kind=spec.kind, source=spec.source, path=spec.path, tfds_name=spec.tfds_name,
                     split=spec.split or "train", data_dir=spec.data_dir, data_key=spec.data_key,
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
