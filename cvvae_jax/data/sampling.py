"""Clip and crop sampling: which frames, which stride, which resize and which crop.

Pure functions of a `numpy.random.Generator` and a record's metadata, plus `sample_example`, which
decodes just what was chosen. The random draws happen in a fixed order (stride, start, short side,
crop offsets), so the same generator state gives the same clip from a folder or a TFDS copy.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from cvvae_jax.data import images, media
from cvvae_jax.data.stats import DataStats


class Crop(enum.Enum):
  RANDOM = "random"
  CENTER = "center"


class Start(enum.Enum):
  RANDOM = "random"  # start frame uniform over all positions where the clip fits
  FIRST = "first"    # clip starts at frame 0 (evaluation)


class Kind(enum.Enum):
  VIDEO = "video"
  IMAGE = "image"


def _parse_enum(cls, value: str, field: str):
  try:
    return cls(value)
  except ValueError:
    raise ValueError(f"{field}: expected one of {[m.value for m in cls]}, got {value!r}") from None


def _pair(value, field: str) -> tuple[int, int]:
  if isinstance(value, int):
    value = (value, value)
  if len(value) != 2 or any(int(v) != v or v < 1 for v in value):
    raise ValueError(f"{field}: expected a positive int or a pair of positive ints, got {value!r}")
  return int(value[0]), int(value[1])


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What one example of a stream looks like: uint8 `[frames, size[0], size[1], 3]`.

  Attributes:
    kind: video or image (an image is a 1-frame clip).
    frames: T = 1 + 4k for videos, 1 for images.
    stride_range: (min, max) frame stride, drawn uniformly per clip (videos).
    size: (H, W) of the crop.
    short_side: (min, max) of the short side after resize, drawn uniformly per example; the resize
      also never goes below the crop size.
    crop: random or center crop.
    start: random start frame, or frame 0.
    stride_fallback: if no stride in `stride_range` fits a video, use the largest stride that does
      (counted in stats as `stride_fallback`); if False (evaluation) such a video is skipped.
  """
  kind: Kind
  frames: int
  stride_range: tuple[int, int]
  size: tuple[int, int]
  short_side: tuple[int, int]
  crop: Crop = Crop.RANDOM
  start: Start = Start.RANDOM
  stride_fallback: bool = True

  @classmethod
  def create(cls, *, kind: str, frames: int, stride, size, short_side, crop: str = "random",
             start: str = "random", stride_fallback: bool = True, where: str = "clip") -> "ClipSpec":
    """Parses and checks config values; `where` names the config section in error messages."""
    kind_ = _parse_enum(Kind, kind, f"{where}.kind")
    if kind_ is Kind.VIDEO and (frames < 1 or (frames - 1) % 4):
      raise ValueError(f"{where}.frames: expected T = 1 + 4k frames for a video stream, got {frames}")
    if kind_ is Kind.IMAGE and frames != 1:
      raise ValueError(f"{where}.frames: expected 1 for an image stream, got {frames}")
    stride_ = _pair(stride, f"{where}.stride")
    short_ = _pair(short_side, f"{where}.short_side")
    for name, (lo, hi) in (("stride", stride_), ("short_side", short_)):
      if lo > hi:
        raise ValueError(f"{where}.{name}: expected (min, max) with min <= max, got {(lo, hi)}")
    return cls(kind=kind_, frames=int(frames), stride_range=stride_, size=_pair(size, f"{where}.size"),
               short_side=short_, crop=_parse_enum(Crop, crop, f"{where}.crop"),
               start=_parse_enum(Start, start, f"{where}.start"), stride_fallback=bool(stride_fallback))


def choose_stride(rng: np.random.Generator, num_frames: int, frames: int,
                  stride_range: tuple[int, int], fallback: bool = True) -> tuple[int, bool]:
  """Draws a frame stride for a `frames`-frame clip out of a `num_frames`-frame video.

  The stride is uniform over the strides in `stride_range` that fit
  (`(frames - 1) * stride + 1 <= num_frames`). If none fits, the largest stride that fits is used
  (a fallback) when `fallback` is set.

  Returns:
    (stride, fell_back).
  Raises:
    media.BadInput: the video is too short even at stride 1 (or for the range, without fallback).
  """
  lo, hi = stride_range
  max_fit = (num_frames - 1) // (frames - 1) if frames > 1 else hi
  if max_fit >= lo:
    return int(rng.integers(lo, min(hi, max_fit) + 1)), False
  if fallback and max_fit >= 1:
    return int(max_fit), True
  need = (frames - 1) * (lo if not fallback else 1) + 1
  raise media.BadInput(f"too short: {num_frames} frames, a {frames}-frame clip needs at least {need}")


def clip_indices(rng: np.random.Generator, num_frames: int, frames: int, stride: int,
                 start: Start) -> np.ndarray:
  """Frame numbers `start + stride * arange(frames)`; the start is uniform where the clip fits."""
  span = (frames - 1) * stride + 1
  first = int(rng.integers(0, num_frames - span + 1)) if start is Start.RANDOM else 0
  return first + stride * np.arange(frames)


def crop_offsets(rng: np.random.Generator, shape: tuple[int, int], size: tuple[int, int],
                 crop: Crop) -> tuple[int, int]:
  """Top-left corner of a `size` crop inside `shape` (random uniform, or centred)."""
  dy, dx = shape[0] - size[0], shape[1] - size[1]
  if crop is Crop.RANDOM:
    return int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))
  return dy // 2, dx // 2


def sample_example(record: dict[str, Any], spec: ClipSpec, rng: np.random.Generator, *,
                   stats: DataStats | None = None, decode_threads: int = 1) -> np.ndarray:
  """Samples, decodes, resizes and crops one example.

  Args:
    record: {"data": encoded bytes, and for videos "num_frames", "height", "width"}.
    spec: the stream's clip spec.
    rng: drawn from in a fixed order: stride, start, short side, crop offsets.
    stats: receives `stride_fallback` counts.
    decode_threads: codec threads per video decode.
  Returns:
    uint8 `[spec.frames, H, W, 3]` with (H, W) = spec.size.
  Raises:
    media.BadInput: the example cannot be used.
  """
  h, w = spec.size
  if spec.kind is Kind.VIDEO:
    num_frames = int(record["num_frames"])
    stride, fell_back = choose_stride(rng, num_frames, spec.frames, spec.stride_range,
                                      spec.stride_fallback)
    if fell_back and stats is not None:
      stats.count("stride_fallback")
    indices = clip_indices(rng, num_frames, spec.frames, stride, spec.start)
    short = int(rng.integers(spec.short_side[0], spec.short_side[1] + 1))
    shape = media.resized_shape(int(record["height"]), int(record["width"]), spec.size, short)
    y, x = crop_offsets(rng, shape, spec.size, spec.crop)
    frames = media.decode_video_frames(record["data"], indices, shape[0], shape[1],
                                       threads=decode_threads)
    return frames[:, y:y + h, x:x + w]
  image = images.open_image(record["data"])
  short = int(rng.integers(spec.short_side[0], spec.short_side[1] + 1))
  shape = media.resized_shape(*images.oriented_size(image), spec.size, short)
  y, x = crop_offsets(rng, shape, spec.size, spec.crop)
  return images.load_image(image, shape[0], shape[1])[None, y:y + h, x:x + w]
