"""Which clips a dataset encodes: `--data` read as a folder, a TFDS name or the embedded set, and the fixed clip list.

The evaluation's sampling (`data.sampling`, `data.pipeline.create_eval_iterator`): `frames` frames at a fixed
`stride` (no fallback: a video too short for one clip is skipped and listed), the short side resized to cover the
`resolution` crop (swscale bicubic), centre-cropped. With `clips_per_video` = n > 1, a video gives n clips whose
first frames are spread evenly from frame 0 to the last start where a clip fits (they overlap when the video is
short). Clip c is clip `c % n` of video `c // n`, videos in the source's order (sorted relative paths, as for
training), so the clip list is a function of the data and the flags alone, the same on every host and every rerun.

Images (a folder of images, `embedded:image`, a TFDS image dataset) are one-frame clips, as in the evaluation: the
short side resized (PIL bicubic) to cover the crop, centre-cropped; `frames`, `stride` and `clips_per_video` are 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cvvae_jax.data import media, sources
from cvvae_jax.data.sampling import ClipSpec, Crop, Kind, crop_offsets, sample_example
from cvvae_jax.data.stats import DataStats

EMBEDDED_DIR = "~/.cache/cvvae_jax/data"


@dataclasses.dataclass(frozen=True)
class ClipSettings:
  """The clip read for each entry of the clip list: uint8 `[frames, H, W, 3]`, `resolution` = (H, W)."""

  frames: int
  stride: int
  resolution: tuple[int, int]
  clips_per_video: int = 1

  def __post_init__(self):
    for name in ("frames", "stride", "clips_per_video"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}: expected a positive number, got {getattr(self, name)}")

  @property
  def span(self) -> int:
    """Source frames one clip covers."""
    return (self.frames - 1) * self.stride + 1


def frame_indices(num_frames: int, settings: ClipSettings, j: int) -> np.ndarray:
  """The frame numbers of clip `j` of a `num_frames`-frame video (see the module docstring).

  Raises:
    media.BadInput: the video is too short for one clip.
  """
  if num_frames < settings.span:
    raise media.BadInput(f"too short: {num_frames} frames, a {settings.frames}-frame clip at stride "
                         f"{settings.stride} needs at least {settings.span}")
  n = settings.clips_per_video
  last = num_frames - settings.span
  first = 0 if n == 1 else int(round(j * last / (n - 1)))
  return first + settings.stride * np.arange(settings.frames)


def load_clip(record: dict[str, Any], settings: ClipSettings, j: int,
              kind: str = "video") -> tuple[np.ndarray, np.ndarray, float]:
  """Clip `j` of a source record: (uint8 `[frames, H, W, 3]`, frame numbers, fps of the clip); for an image
  (`kind="image"`), `[1, H, W, 3]`, frame [0], fps 0.

  Raises:
    media.BadInput: too short or unreadable.
  """
  if kind == "image":
    # The training pipeline's image path (any mode to RGB, EXIF orientation), its short side fixed, centred.
    short = min(settings.resolution)
    spec = ClipSpec(Kind.IMAGE, 1, (1, 1), tuple(settings.resolution), (short, short), Crop.CENTER)
    return sample_example(record, spec, np.random.default_rng(0)), np.zeros(1, np.int64), 0.0
  indices = frame_indices(int(record["num_frames"]), settings, j)
  shape = media.resized_shape(int(record["height"]), int(record["width"]), settings.resolution,
                              min(settings.resolution))
  y, x = crop_offsets(np.random.default_rng(0), shape, settings.resolution, Crop.CENTER)  # no draw when centred
  frames = media.decode_video_frames(record["data"], indices, shape[0], shape[1])
  h, w = settings.resolution
  fps = float(record.get("fps", 0.0)) / settings.stride
  return frames[:, y:y + h, x:x + w], indices, fps


def open_data(spec: sources.DataSpec, stats: DataStats, *, embedded_dir: str = EMBEDDED_DIR) -> sources.Source:
  """The random-access source of `sources.describe_data`'s answer (bad files left out by the probe are in `stats`)."""
  return sources.open_source(kind=spec.kind, source=spec.source, path=spec.path, tfds_name=spec.tfds_name,
                             split=spec.split, data_dir=spec.data_dir, data_key=spec.data_key,
                             embedded_dir=embedded_dir, stats=stats, where="data")
