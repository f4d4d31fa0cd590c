"""The settings of an evaluation run (`EvalConfig`, stored in metrics.json) and the error every misfit raises."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from cvvae_jax import cli
from cvvae_jax.inference.plan import DEFAULT as TILING, TilingConfig
from cvvae_jax.models import lpips, registry
from cvvae_jax.models.conv_impl import CONV_IMPLS

METRICS = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}
ROLES = ("model", "baseline", "image_vae")
COMPAT_PSI = ("slice", "mean", "first")
NONE = "none"
LPIPS_FRAMES_PER_CALL = 8  # VGG activations of at most this many frames at once
# The paper's Table 1 protocols (notes, "Results to reproduce"): the clip each dataset gives. The dataset itself is
# the user's (`--data`: WebVid-val videos, COCO2017-val images).
PROTOCOLS = {"webvid": dict(frames=33, stride=3, resolution=(256, 256), data_kind="video"),
             "coco": dict(frames=1, stride=1, resolution=(256, 256), data_kind="image")}
# The paper's Table 1 (notes, "Results to reproduce": 256x256, COCO2017-val images, 1024 WebVid-val videos of 33
# frames at stride 3): PSNR, SSIM, LPIPS per model class, shown as reference rows beside ours.
PAPER_TABLE1 = {
    "SD2.1 image VAE": {"coco": (26.6, 0.773, 0.127), "webvid": (28.9, 0.810, 0.145)},
    "CV-VAE 2D+3D": {"coco": (27.6, 0.805, 0.136), "webvid": (28.5, 0.817, 0.143)},
    "CV-VAE all-3D": {"coco": (27.7, 0.805, 0.135), "webvid": (28.6, 0.819, 0.145)},
    "SD3 image VAE": {"coco": (32.6, 0.899, 0.064), "webvid": (33.4, 0.910, 0.064)},
    "CV-VAE SD3": {"coco": (33.6, 0.916, 0.072), "webvid": (32.0, 0.899, 0.087)},
}


class EvaluationError(ValueError):
  """A setting, model or dataset that cannot be evaluated as asked (raised before any work)."""


def parse_resolution(value: "int | str | Sequence[int]") -> tuple[int, int]:
  """`256` / `"256"` -> (256, 256); `"256x384"` or (256, 384) -> (H, W) (`cli.parse_resolution`)."""
  try:
    return cli.parse_resolution(value)
  except ValueError as e:
    raise EvaluationError(str(e)) from None


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
    batch_size: clips per step, over every process; each process reads batch_size / processes of them and shards
      them over its devices (as many as divide its share, at most `devices`; 0: all of its devices).
    data_kind: "auto", "video" or "image".
    split, data_dir, data_key: TFDS split ("" = validation, else test, else train), data folder, and the feature
      holding the encoded file ("" = "data" for our builders, "image" for TFDS image datasets).
    embedded_dir: cache of the embedded dataset.
    tiling, tile, chunk, overlap: `tiling.TilingConfig` mode ("tiled", "original", "exact"), spatial tile in pixels
      (0: none), encoder chunk in frames, 1 + 4m (0: none; the decoder takes 1 + m latents), tile overlap ratio;
      None: the default (576, 17, 0.2222), in "original" mode each model's own (its config.json), as the original
      code tiles it.
    dtype: compute dtype of the VAEs ("float32" or "bfloat16"); metrics are float32.
    conv_impl: how the VAEs compute convolutions (`models.conv_impl.CONV_IMPLS`; "auto": per platform).
    lpips, lpips_net: compute LPIPS too, with the VGG16 ("vgg") or AlexNet ("alex") backbone.
    fvd: compute rFVD (I3D features of the inputs and of each reconstruction; clips of >= 9 frames);
      fvd_bootstrap: resamples of the clips for its 95% interval (0: none).
    protocol: "" or the name of a Table-1 protocol (`PROTOCOLS`) whose settings made these (see `for_protocol`);
      the report then shows the paper's figures of the same model class beside ours.
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
  tiling: str = TILING.mode.value
  tile: int | None = None
  chunk: int | None = None
  overlap: float | None = None
  dtype: str = "float32"
  conv_impl: str = "auto"
  lpips: bool = True
  lpips_net: str = "vgg"
  fvd: bool = True
  fvd_bootstrap: int = 100
  protocol: str = ""
  devices: int = 0
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
    for name in ("max_clips", "num_samples", "tile", "chunk", "fvd_bootstrap", "devices"):
      if getattr(self, name) is not None and int(getattr(self, name)) < 0:
        problems.append(f"{name}: expected >= 0, got {getattr(self, name)}")
    if self.sample_frames < 1:
      problems.append(f"sample_frames: expected >= 1, got {self.sample_frames}")
    if self.data_kind not in ("auto", "video", "image"):
      problems.append(f"data_kind: expected 'auto', 'video' or 'image', got {self.data_kind!r}")
    if self.dtype not in registry.DTYPES:
      problems.append(f"dtype: expected one of {sorted(registry.DTYPES)}, got {self.dtype!r}")
    if self.conv_impl not in CONV_IMPLS:
      problems.append(f"conv_impl: expected one of {list(CONV_IMPLS)}, got {self.conv_impl!r}")
    try:
      self.tiling_config()
    except EvaluationError as e:
      problems.append(str(e))
    if self.lpips_net not in lpips.NETS:
      problems.append(f"lpips_net: expected one of {lpips.NETS}, got {self.lpips_net!r}")
    if self.protocol and self.protocol not in PROTOCOLS:
      problems.append(f"protocol: expected one of {sorted(PROTOCOLS)} (or none), got {self.protocol!r}")
    for p in self.compat_psi:
      if p not in COMPAT_PSI:
        problems.append(f"compat_psi: expected some of {COMPAT_PSI} (random is not reproducible), got {p!r}")
    if problems:
      raise EvaluationError("invalid evaluation settings:\n  " + "\n  ".join(problems))

  @classmethod
  def for_protocol(cls, protocol: str, **fields) -> "EvalConfig":
    """The settings of a Table-1 protocol (`PROTOCOLS`), with `fields` (model, data, out, ...) on top."""
    if protocol not in PROTOCOLS:
      raise EvaluationError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    return cls(**{**PROTOCOLS[protocol], **fields, "protocol": protocol})

  def tiling_config(self) -> TilingConfig:
    try:
      return TilingConfig.from_options(self.tiling, self.tile, self.chunk, self.overlap)
    except ValueError as e:
      raise EvaluationError(f"tiling settings: {e}") from None

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["resolution"] = list(self.resolution)
    d["compat_psi"] = list(self.compat_psi)
    return d
