"""How a video is split for encoding and decoding: chunks in time, tiles in space, planned on the latent grid.

Everything here is a function of `fn(params, x) -> y` on 5D arrays `[B, t, H, W, C]` plus a `Geometry` that says how
the latent grid maps to `fn`'s input and output, so one implementation serves the CV-VAE encoder and decoder (video
mode) and per-frame image coders (the SD image VAE, or CV-VAE on single frames).

Plans are made on the *latent grid* (latent frames x latent rows x latent columns). A span `[a, a + L)` of latent
frames is `[tc * a, tc * a + tc * (L - 1) + 1)` video frames (T = 1 + 4k); a span of latent pixels is `sc` times
as many image pixels. Three modes (`Mode`):

  EXACT     Only splits that cannot change the result: video goes through in one pass (identical to
            `vae.encode` / `vae.decode`); in image mode, frames go through in groups (frames are independent).
  TILED     Ours. Time: chunks of `1 + m` latents (`1 + 4m` frames) overlapping by one latent, as in the original,
            except that the last chunk is moved back to end at the video's end instead of being shorter, so every
            chunk has one shape and the compiled function is reused (no padding frames: a padded chunk would change
            the GroupNorm statistics); outputs already produced by an earlier chunk are kept (the duplicate first
            latent / frame of each later chunk is dropped). Space: equal tiles of `tile_size` pixels (`tile_size / 8`
            latents) overlapping by `round(overlap * tile)` latents, the last moved back to the border, blended with
            separable linear cross-fade windows that sum to one. Runs as `lax.scan`s (pure, jittable, compiles the
            model once).
  ORIGINAL  The original code's `tiled_encode` / `tiled_decode` exactly: rounds of 16 frames / 4 latents (the last
            one shorter), tiles taken every 448 px / 56 latents and cut off at the border, sequential in-place
            blends (top, then left, with w = k / overlap on the new tile) over 16 latents / 128 pixels, crop to the
            stride, concatenate. Tiles and chunks come in up to 2 x 4 shapes, so up to 8 compilations. These are
            the released models' numbers; the original takes them from the model's config.json
            (`tile_spatial_size`, `tile_overlap_ratio`, `en_de_n_frames_a_time`), and so does this mode: sizes not
            given explicitly are `FROM_MODEL` and `TilingConfig.resolve(OriginalSettings(...))` fills them in
            (`inference.api` does, from the model's fields; `make_plan` alone uses the released numbers).

Where tiled output differs from untiled output: GroupNorm normalizes over (T, H, W) jointly, so any chunk or tile
that does not cover the whole input sees different statistics; the decoder's temporal attention also spans the chunk
only. TILED and ORIGINAL are therefore approximations (see `bench/README.md` for measured PSNR); when one chunk and
one tile cover the input, both are identical to the untiled pass.

Running a plan is `tiling.py`'s job; this module is pure Python on static shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Mode", "FROM_MODEL", "OriginalSettings", "TilingConfig", "DEFAULT",
           "add_tiling_arguments", "Geometry", "Span", "SpatialPlan", "Plan",
           "even_spans", "original_spans", "original_tile_numbers", "make_plan", "blend_windows"]

class Mode(enum.Enum):
  EXACT = "exact"
  TILED = "tiled"
  ORIGINAL = "original"

  @classmethod
  def parse(cls, value: "Mode | str") -> "Mode":
    if isinstance(value, cls):
      return value
    try:
      return cls(value)
    except ValueError:
      raise ValueError(f"unknown tiling mode {value!r}; expected one of {[m.value for m in cls]}") from None


class FromModel(enum.Enum):
  """The default of a `TilingConfig` size in ORIGINAL mode: the model's own setting (`TilingConfig.resolve`)."""

  FROM_MODEL = "from_model"

  def __repr__(self) -> str:
    return "FROM_MODEL"


FROM_MODEL = FromModel.FROM_MODEL
_SIZES = ("encode_chunk_frames", "decode_chunk_latents", "tile_size", "overlap")


@dataclasses.dataclass(frozen=True)
class OriginalSettings:
  """How the original code tiles and chunks one model: its config.json's `tile_spatial_size` (`tile_size` pixels;
  None: no tiling), `tile_overlap_ratio` (`overlap`) and `en_de_n_frames_a_time` (`round_frames`: video frames per
  round, rounds take one more; None: no chunking). The defaults are the released models' (576, 0.2222, 16)."""

  tile_size: int | None = 576
  overlap: float | None = 0.2222
  round_frames: int | None = 16
  temporal_compression: int = 4

  def sizes(self) -> dict:
    """The `TilingConfig` sizes of these settings: chunks of `round_frames + 1` frames / `round_frames / 4 + 1`
    latents (released: 17 / 5), `tile_size` pixels overlapping by `overlap`."""
    rf, tc = self.round_frames, self.temporal_compression
    if rf is not None and (rf < tc or rf % tc):
      raise ValueError(f"original round of {rf} frames: expected a positive multiple of {tc}")
    return {"encode_chunk_frames": None if rf is None else rf + 1,
            "decode_chunk_latents": None if rf is None else rf // tc + 1, "tile_size": self.tile_size,
            "overlap": 0.2222 if self.overlap is None else float(self.overlap)}


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  """How to split a video (static, hashable: usable as a `jax.jit` static argument).

  Attributes:
    mode: see `Mode`.
    encode_chunk_frames: video frames per encoder chunk, 1 + 4m (default 17); None: no temporal chunking.
    decode_chunk_latents: latent frames per decoder chunk, 1 + m (default 5); None: no temporal chunking.
    frame_chunk: frames per pass in image mode (every mode; exact); None: all frames at once.
    tile_size: spatial tile in pixels (default 576; `tile_size / 8` latents); None: no spatial tiling.
    overlap: tile overlap as a fraction of the tile (default 0.2222).
  The four sizes default to `FROM_MODEL`: in TILED and EXACT mode that is the default above; in ORIGINAL mode it is
  the model's own setting (`resolve`), the default above for the released models. Explicit values always win.
  """

  mode: Mode = Mode.TILED
  encode_chunk_frames: int | None | FromModel = FROM_MODEL
  decode_chunk_latents: int | None | FromModel = FROM_MODEL
  frame_chunk: int | None = 8
  tile_size: int | None | FromModel = FROM_MODEL
  overlap: float | FromModel = FROM_MODEL

  def __post_init__(self):
    object.__setattr__(self, "mode", Mode.parse(self.mode))
    if self.mode is not Mode.ORIGINAL:
      for name, value in OriginalSettings().sizes().items():
        if getattr(self, name) is FROM_MODEL:
          object.__setattr__(self, name, value)
    for name in ("encode_chunk_frames", "decode_chunk_latents", "frame_chunk", "tile_size"):
      value = getattr(self, name)
      if value is not None and value is not FROM_MODEL and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"TilingConfig.{name} must be a positive int or None, got {value!r}")
    if self.decode_chunk_latents not in (None, FROM_MODEL) and self.decode_chunk_latents < 2:
      raise ValueError(f"TilingConfig.decode_chunk_latents must be >= 2 (chunks overlap by one latent), got "
                       f"{self.decode_chunk_latents}")
    if self.overlap is not FROM_MODEL and not 0.0 <= self.overlap < 0.5:
      raise ValueError(f"TilingConfig.overlap must be in [0, 0.5), got {self.overlap}")

  @property
  def follows_model(self) -> bool:
    """Whether some size is still `FROM_MODEL` (ORIGINAL mode, not given explicitly)."""
    return any(getattr(self, name) is FROM_MODEL for name in _SIZES)

  def resolve(self, original: OriginalSettings | None = None) -> "TilingConfig":
    """This config with every `FROM_MODEL` size taken from `original` (default: the released models' settings)."""
    if not self.follows_model:
      return self
    sizes = (original or OriginalSettings()).sizes()
    return dataclasses.replace(self, **{n: sizes[n] for n in _SIZES if getattr(self, n) is FROM_MODEL})

  @classmethod
  def from_options(cls, mode: "Mode | str" = Mode.TILED, tile: int | None = None, chunk: int | None = None,
                   overlap: float | None = None) -> "TilingConfig":
    """From the command-line options (`add_tiling_arguments`): `tile` pixels (0: no spatial tiling), encoder
    `chunk` frames, 1 + 4m (0: no temporal chunking; the decoder then takes chunks of 1 + m latents), `overlap`;
    None: the default (ORIGINAL mode: the model's)."""
    if chunk and chunk % 4 != 1:
      raise ValueError(f"chunk: expected 1 + 4m frames (or 0 for no chunking), got {chunk}")
    if chunk is None:
      frames = latents = FROM_MODEL
    else:
      frames, latents = (chunk, (chunk - 1) // 4 + 1) if chunk else (None, None)
    return cls(mode=mode, encode_chunk_frames=frames, decode_chunk_latents=latents,
               tile_size=FROM_MODEL if tile is None else tile or None,
               overlap=FROM_MODEL if overlap is None else overlap)


DEFAULT = TilingConfig()


def add_tiling_arguments(parser: argparse.ArgumentParser, aliases: Mapping[str, Sequence[str]] = {},
                         follow_model: bool = False) -> None:
  """--tiling, --tile, --chunk, --overlap with the defaults of `TilingConfig` (see `TilingConfig.from_options`);
  `aliases` adds older names of a flag. `follow_model`: the sizes default to None (`from_options`: the default, in
  ORIGINAL mode the model's) instead of the TILED numbers."""
  parser.add_argument("--tiling", *aliases.get("--tiling", ()), default=DEFAULT.mode.value,
                      choices=[m.value for m in Mode],
                      help="chunking/tiling mode: tiled (ours), original (the original code's), exact (no splits)")
  model = "; original mode: the model's config.json" if follow_model else ""
  parser.add_argument("--tile", type=int, default=None if follow_model else DEFAULT.tile_size,
                      help=f"spatial tile in pixels (0: no tiling; default {DEFAULT.tile_size}{model})")
  parser.add_argument("--chunk", type=int, default=None if follow_model else DEFAULT.encode_chunk_frames,
                      help=f"frames per encoder chunk, 1 + 4m (0: no chunking; default {DEFAULT.encode_chunk_frames}"
                      f"{model}); the decoder uses chunks of 1 + m latents")
  parser.add_argument("--overlap", type=float, default=None if follow_model else DEFAULT.overlap,
                      help=f"tile overlap ratio (default {DEFAULT.overlap}{model})")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a span of the latent grid maps to `fn`'s input and output.

  `time_in`/`time_out`: frames per latent frame on the input/output side (4 for video pixels, 1 for latents or in
  image mode); a span of L latent frames is `time * (L - 1) + 1` frames. `space_in`/`space_out`: pixels per latent
  pixel (8 or 1). `time_overlap`: latent frames shared by consecutive chunks (1 for causal video, whose chunks
  each begin with an image slot; 0 for independent frames).
  """

  time_in: int
  space_in: int
  time_out: int
  space_out: int
  time_overlap: int

  @classmethod
  def video_encoder(cls, temporal: int = 4, spatial: int = 8) -> "Geometry":
    return cls(temporal, spatial, 1, 1, 1)

  @classmethod
  def video_decoder(cls, temporal: int = 4, spatial: int = 8) -> "Geometry":
    return cls(1, 1, temporal, spatial, 1)

  @classmethod
  def image_encoder(cls, spatial: int = 8) -> "Geometry":
    return cls(1, spatial, 1, 1, 0)

  @classmethod
  def image_decoder(cls, spatial: int = 8) -> "Geometry":
    return cls(1, 1, 1, spatial, 0)

  @property
  def encodes(self) -> bool:
    return self.space_in > 1 or self.time_in > 1

  @property
  def image_mode(self) -> bool:
    return self.time_overlap == 0

  def latent_grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """Input shape `[B, T, H, W, C]` -> latent grid (frames, rows, columns), checking divisibility."""
    if len(shape) != 5:
      raise ValueError(f"expected a 5D input [B, T, H, W, C], got shape {tuple(shape)}")
    t, h, w = shape[1:4]
    if (t - 1) % self.time_in or t < 1:
      raise ValueError(f"expected T = 1 + {self.time_in}k frames, got T={t}")
    if h % self.space_in or w % self.space_in:
      raise ValueError(f"expected H and W to be multiples of {self.space_in}, got H={h}, W={w}")
    return (t - 1) // self.time_in + 1, h // self.space_in, w // self.space_in

  def out_shape(self, grid: tuple[int, int, int], batch: int, channels: int) -> tuple[int, ...]:
    t, h, w = grid
    return (batch, self.time_out * (t - 1) + 1, h * self.space_out, w * self.space_out, channels)


@dataclasses.dataclass(frozen=True, order=True)
class Span:
  """`[start, start + size)` on one axis of the latent grid."""

  start: int
  size: int

  @property
  def end(self) -> int:
    return self.start + self.size

  def frames(self, factor: int) -> tuple[int, int]:
    """(first frame, number of frames) of this span of latent frames at `factor` frames per latent."""
    return factor * self.start, factor * (self.size - 1) + 1

  def pixels(self, factor: int) -> tuple[int, int]:
    return factor * self.start, factor * self.size


@dataclasses.dataclass(frozen=True)
class SpatialPlan:
  """The tiles of one chunk. `stride` (latents) is used by ORIGINAL's crop-and-blend only."""

  mode: Mode
  rows: tuple[Span, ...]
  cols: tuple[Span, ...]
  stride: int = 0

  @property
  def num_tiles(self) -> int:
    return len(self.rows) * len(self.cols)


@dataclasses.dataclass(frozen=True)
class Plan:
  time: tuple[Span, ...]
  space: SpatialPlan
  grid: tuple[int, int, int]

  def __str__(self):
    return (f"{self.space.mode.value}: {len(self.time)} chunk(s) of {sorted({s.size for s in self.time})} latent "
            f"frames, {len(self.space.rows)}x{len(self.space.cols)} tiles of "
            f"{sorted({(r.size, c.size) for r in self.space.rows for c in self.space.cols})} latents")


# ----------------------------------------------------------------------------------------------------------------
# Planning (pure Python on static shapes).


def even_spans(n: int, size: int, overlap: int) -> tuple[Span, ...]:
  """Spans of equal `size` covering `[0, n)`, each starting `size - overlap` after the previous one, the last moved
  back to end at `n`. One span `[0, n)` if `n <= size`."""
  if size <= overlap:
    raise ValueError(f"span size {size} must exceed the overlap {overlap}")
  if n <= size:
    return (Span(0, n),)
  stride = size - overlap
  count = math.ceil((n - size) / stride) + 1
  return tuple(Span(min(i * stride, n - size), size) for i in range(count))


def original_spans(n: int, size: int, stride: int) -> tuple[Span, ...]:
  """The original's loop: spans start every `stride`, are cut off at `n`, and stop once one reaches `n`."""
  spans, start = [], 0
  while True:
    spans.append(Span(start, min(size, n - start)))
    if start + size >= n:
      return tuple(spans)
    start += stride


def original_tile_numbers(tile_size: int, overlap: float, spatial: int, encodes: bool) -> tuple[int, int]:
  """(latent tile, latent stride) exactly as the original computes them (Python `round`), checked for consistency.

  Encode: pixel stride round(P (1 - r)), latent overlap round(L r), latent stride L - overlap.
  Decode: latent stride round(L (1 - r)), pixel overlap round(P r), pixel stride P - overlap.
  """
  if tile_size % spatial:
    raise ValueError(f"tile_size must be a multiple of {spatial} pixels, got {tile_size}")
  latent_tile = tile_size // spatial
  if encodes:
    pixel_stride = round(tile_size * (1 - overlap))
    latent_stride = latent_tile - round(latent_tile * overlap)
  else:
    latent_stride = round(latent_tile * (1 - overlap))
    pixel_stride = tile_size - round(tile_size * overlap)
  if pixel_stride != spatial * latent_stride:
    raise ValueError(f"tile_size={tile_size}, overlap={overlap}: the original's pixel stride {pixel_stride} is not "
                     f"{spatial} x its latent stride {latent_stride}, so its tiles would not line up; choose a tile "
                     "and overlap with round(tile * (1 - overlap)) a multiple of 8")
  return latent_tile, latent_stride


def make_plan(config: TilingConfig, geometry: Geometry, shape: Sequence[int]) -> Plan:
  """The chunks and tiles for an input of `shape` `[B, T, H, W, C]` under `config` (sizes still `FROM_MODEL`: the
  released models' settings; `inference.api` resolves them from the model first)."""
  config = config.resolve()
  grid = geometry.latent_grid(shape)
  n_t, n_h, n_w = grid
  mode = config.mode
  # Time.
  if geometry.image_mode:
    chunk = config.frame_chunk or n_t
    time = even_spans(n_t, chunk, 0)
  else:
    if geometry.encodes:
      frames = config.encode_chunk_frames
      if frames is not None and (frames - 1) % geometry.time_in:
        raise ValueError(f"encode_chunk_frames must be 1 + {geometry.time_in}m, got {frames}")
      chunk = None if frames is None else (frames - 1) // geometry.time_in + 1
    else:
      chunk = config.decode_chunk_latents
    if mode is Mode.EXACT or chunk is None or chunk >= n_t:
      time = (Span(0, n_t),)
    elif chunk < 2:
      raise ValueError(f"a video chunk must hold at least 2 latent frames (5 video frames), got {chunk}")
    elif mode is Mode.ORIGINAL:
      time = original_spans(n_t, chunk, chunk - geometry.time_overlap)
    else:
      time = even_spans(n_t, chunk, geometry.time_overlap)
  # Space.
  spatial = max(geometry.space_in, geometry.space_out)
  if mode is Mode.EXACT or config.tile_size is None:
    space = SpatialPlan(mode, (Span(0, n_h),), (Span(0, n_w),))
  elif mode is Mode.ORIGINAL:
    tile, stride = original_tile_numbers(config.tile_size, config.overlap, spatial, geometry.encodes)
    space = SpatialPlan(mode, original_spans(n_h, tile, stride), original_spans(n_w, tile, stride), stride)
  else:
    if config.tile_size % spatial:
      raise ValueError(f"tile_size must be a multiple of {spatial} pixels, got {config.tile_size}")
    tile = config.tile_size // spatial
    overlap = min(round(tile * config.overlap), tile - 1)
    space = SpatialPlan(mode, even_spans(n_h, tile, overlap), even_spans(n_w, tile, overlap))
  return Plan(time=time, space=space, grid=grid)


def blend_windows(spans: Sequence[Span], factor: int) -> np.ndarray:
  """Linear cross-fade windows `[len(spans), size * factor]` (output units) that sum to one at every position.

  Each span ramps up over its overlap with the previous span and down over its overlap with the next one,
  w = (k + 1) / (overlap + 1); where more than two spans meet, the windows are renormalized.
  """
  n = spans[-1].end * factor
  raw = np.zeros((len(spans), n))
  for i, s in enumerate(spans):
    a, b = s.start * factor, s.end * factor
    pos = np.arange(a, b, dtype=np.float64)
    w = np.ones(b - a)
    if i > 0 and spans[i - 1].end * factor > a:
      ov = spans[i - 1].end * factor - a
      w = np.minimum(w, (pos - a + 1) / (ov + 1))
    if i + 1 < len(spans) and spans[i + 1].start * factor < b:
      ov = b - spans[i + 1].start * factor
      w = np.minimum(w, (b - pos) / (ov + 1))
    raw[i, a:b] = w
  total = raw.sum(0)
  if np.any(total <= 0):
    raise ValueError(f"spans {spans} do not cover [0, {spans[-1].end})")
  raw /= total
  return np.stack([raw[i, s.start * factor:s.end * factor] for i, s in enumerate(spans)]).astype(np.float32)
