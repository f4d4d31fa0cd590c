"""The header of ISO-BMFF files (mp4, mov, m4v, 3gp), read without FFmpeg: the first video track's size, display
matrix and sample table. Probing a folder of short web clips is dominated by opening each file with FFmpeg (1-2.5
ms); the header answers the same questions in a fraction of that (`bench/README_data.md`).

`probe` gives the frame count, rate and size only where the header states them exactly as FFmpeg's demuxer
would present them: one constant frame duration (the last sample may differ), composition offsets on that grid, at
most one edit that keeps every sample, no fragments, and the last sample's bytes inside the file (a cut download is
caught here). Anything else returns None, and the caller asks FFmpeg (`folders.probe_video_file`).
"""
from __future__ import annotations

import dataclasses
import fractions
import struct
from typing import BinaryIO, Iterator

import numpy as np

_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin")
_MAX_BOX_BYTES = 64 << 20  # a sample table larger than this is left to FFmpeg
_FULL_TURN = 1 << 16  # 1.0 in 16.16 fixed point (edit rates)


@dataclasses.dataclass
class VideoTrack:
  """The first video track of a file, as its header states it (sizes as coded, before the display matrix)."""

  matrix: tuple[int, ...] | None = None  # tkhd's 3x3 display matrix, 16.16 / 2.30 fixed point, row-major
  width: int = 0
  height: int = 0
  timescale: int = 0  # ticks per second of the media (mdhd)
  movie_timescale: int = 0  # of the edit list's durations (mvhd)
  edits: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (duration, media time, rate)
  durations: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # stts (count, delta)
  offsets: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # ctts (count, offset)
  sizes: np.ndarray | None = None  # bytes of each sample (stsz)
  chunks: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # stsc (first chunk, samples per chunk)
  chunk_offsets: np.ndarray | None = None  # stco / co64
  fragmented: bool = False  # moov has mvex: samples live in fragments the table does not list


def boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
  """(type, payload start, box end) of the boxes in bytes [start, end) of `f`; stops at a damaged header."""
  pos = start
  while pos + 8 <= end:
    f.seek(pos)
    head = f.read(8)
    if len(head) < 8:
      return
    size, kind = struct.unpack(">I4s", head)
    header = 8
    if size == 1:
      large = f.read(8)
      if len(large) < 8:
        return
      size, header = struct.unpack(">Q", large)[0], 16
    elif size == 0:
      size = end - pos  # to the end of the enclosing box (or file)
    if size < header:
      return
    yield kind, pos + header, min(pos + size, end)
    pos += size


def _payload(f: BinaryIO, start: int, end: int) -> bytes:
  if end - start > _MAX_BOX_BYTES:
    raise _Unsupported(f"a box of {end - start} bytes")
  f.seek(start)
  return f.read(end - start)


class _Unsupported(Exception):
  """The header says something `probe` does not read exactly: FFmpeg decides."""


class Truncated(ValueError):
  """The file ends before the last frame its header lists."""


def _pairs(body: bytes, offset: int, count: int, fmt: str) -> list[tuple[int, ...]]:
  size = struct.calcsize(fmt)
  if len(body) < offset + count * size:
    raise _Unsupported("a truncated table")
  return list(struct.iter_unpack(fmt, body[offset:offset + count * size]))


def _timescale(body: bytes) -> int:
  """mvhd / mdhd: version 0 has 32-bit times, version 1 64-bit."""
  return struct.unpack(">I", body[20:24] if body[:1] == b"\x01" else body[12:16])[0]


def _read_stbl(f: BinaryIO, start: int, end: int, track: VideoTrack) -> None:
  for kind, a, b in boxes(f, start, end):
    if kind == b"stsd":
      body = _payload(f, a, min(b, a + 256))
      if len(body) >= 8 + 36:  # entry: size, format, 6 reserved, data ref, 16 reserved, width, height
        track.width, track.height = struct.unpack(">HH", body[8 + 32:8 + 36])
    elif kind in (b"stts", b"ctts", b"stsc", b"stco", b"co64", b"stsz"):
      body = _payload(f, a, b)
      if len(body) < 8:
        raise _Unsupported(f"a short {kind.decode()}")
      count = struct.unpack(">I", body[4:8])[0]
      if kind == b"stts":
        track.durations = _pairs(body, 8, count, ">II")
      elif kind == b"ctts":
        track.offsets = _pairs(body, 8, count, ">Ii" if body[:1] == b"\x01" else ">II")
      elif kind == b"stsc":
        track.chunks = [(c, n) for c, n, _ in _pairs(body, 8, count, ">III")]
      elif kind in (b"stco", b"co64"):
        dtype = ">u4" if kind == b"stco" else ">u8"
        track.chunk_offsets = np.frombuffer(body, dtype, count, 8).astype(np.int64)
      else:  # stsz: a common size, or one per sample
        common, count = struct.unpack(">II", body[4:12]) if len(body) >= 12 else (0, 0)
        track.sizes = (np.full(count, common, np.int64) if common else
                       np.frombuffer(body, ">u4", count, 12).astype(np.int64))


def _read_trak(f: BinaryIO, start: int, end: int) -> VideoTrack | None:
  track, video = VideoTrack(), False
  for kind, a, b in boxes(f, start, end):
    if kind == b"tkhd":
      body = _payload(f, a, b)
      offset = 52 if body[:1] == b"\x01" else 40  # version 1 has 64-bit times and duration
      if len(body) >= offset + 36:
        track.matrix = struct.unpack(">9i", body[offset:offset + 36])
    elif kind == b"edts":
      for kind2, a2, b2 in boxes(f, a, b):
        if kind2 == b"elst":
          body = _payload(f, a2, b2)
          count = struct.unpack(">I", body[4:8])[0] if len(body) >= 8 else 0
          track.edits = _pairs(body, 8, count, ">Qqi" if body[:1] == b"\x01" else ">Iii")
    elif kind == b"mdia":
      for kind2, a2, b2 in boxes(f, a, b):
        if kind2 == b"hdlr":
          video = _payload(f, a2, min(b2, a2 + 64))[8:12] == b"vide"
        elif kind2 == b"mdhd":
          track.timescale = _timescale(_payload(f, a2, b2))
        elif kind2 == b"minf":
          for kind3, a3, b3 in boxes(f, a2, b2):
            if kind3 == b"stbl":
              _read_stbl(f, a3, b3, track)
  return track if video else None


def video_track(f: BinaryIO) -> VideoTrack | None:
  """The first video track of the ISO-BMFF file object `f` (in file order, as FFmpeg lists streams); None when `f`
  is no ISO-BMFF file, has no complete `moov`, or no video track. `f`'s position is left undefined."""
  f.seek(0, 2)
  end = f.tell()
  f.seek(4)
  if f.read(4) not in _FIRST_BOXES:
    return None
  try:
    for kind, a, b in boxes(f, 0, end):
      if kind != b"moov":
        continue
      movie_timescale, fragmented = 0, False
      for kind2, a2, b2 in boxes(f, a, b):
        if kind2 == b"mvhd":
          movie_timescale = _timescale(_payload(f, a2, b2))
        elif kind2 == b"mvex":
          fragmented = True
        elif kind2 == b"trak":
          track = _read_trak(f, a2, b2)
          if track is not None:
            track.movie_timescale, track.fragmented = movie_timescale, fragmented
            return track
      return None
  except (_Unsupported, struct.error, ValueError):
    return None
  return None


def _frame_grid(track: VideoTrack) -> tuple[int, np.ndarray] | None:
  """(the constant frame duration, each sample's composition time) in media ticks, or None."""
  n = len(track.sizes) if track.sizes is not None else 0
  durations = [(c, d) for c, d in track.durations if c]
  if not n or sum(c for c, _ in durations) != n or not durations:
    return None
  delta = durations[0][1]
  if delta <= 0 or any(d != delta for _, d in durations[:-1]) or (durations[-1][1] != delta and durations[-1][0] != 1):
    return None  # not one constant frame duration (the last sample's may differ)
  times = np.arange(n, dtype=np.int64) * delta
  if track.offsets:
    counts = np.array([c for c, _ in track.offsets], np.int64)
    if counts.sum() != n:
      return None
    times = times + np.repeat(np.array([o for _, o in track.offsets], np.int64), counts)
  if np.any((times - times.min()) % delta):
    return None  # composition times off the frame grid
  return delta, times


def _keeps_every_sample(track: VideoTrack, times: np.ndarray, delta: int) -> bool:
  """Whether the edit list presents every sample (FFmpeg drops samples outside the edits)."""
  edits = [e for e in track.edits if e[1] != -1]  # media time -1: an empty edit (a delay), drops nothing
  if not edits:
    return True
  if len(edits) > 1 or edits[0][2] != _FULL_TURN or not track.movie_timescale:
    return False
  duration, media_time, _ = edits[0]
  if times.min() < media_time:
    return False
  if duration:  # in movie ticks: the edit ends at media_time + duration
    end = media_time + fractions.Fraction(duration * track.timescale, track.movie_timescale)
    if times.max() + delta > end + delta / 2:  # FFmpeg keeps a sample that starts before the edit's end
      return False
  return True


def probe(f: BinaryIO) -> tuple[dict | None, bool]:
  """`probe_track` of the file object's first video track (`video_track`)."""
  return probe_track(video_track(f), f)


def probe_track(track: VideoTrack | None, f: BinaryIO) -> tuple[dict | None, bool]:
  """(answer, complete) from the header `track` of the ISO-BMFF file object `f`: `answer` is {"num_frames", "fps",
  "height", "width", "matrix"} (sizes as coded; the display matrix for `rotation.py`), or None where FFmpeg must
  decide (see the module docstring); `complete` says that the header lists the video samples and all of them lie
  inside the file (then a frame count below the header's sample count comes from the edit list, not from a cut
  file).

  Raises:
    Truncated: the header lists more bytes than the file holds.
  """
  if track is None or track.fragmented or track.sizes is None or not len(track.sizes):
    return None, False
  n = len(track.sizes)
  if track.chunk_offsets is None or not len(track.chunk_offsets) or not track.chunks:
    return None, False
  # The last sample's bytes: its chunk's offset plus the samples before it in that chunk.
  in_last_chunk = min(n, track.chunks[-1][1])
  last_end = int(track.chunk_offsets[-1] + track.sizes[n - in_last_chunk:].sum())
  f.seek(0, 2)
  if last_end > f.tell():
    raise Truncated(f"truncated: the container lists {n} frames ending at byte {last_end}, the file has "
                    f"{f.tell()} bytes")
  grid = _frame_grid(track)
  if (grid is None or not _keeps_every_sample(track, grid[1], grid[0]) or
      not (track.width and track.height and track.timescale)):
    return None, True
  total = sum(c for c, _ in track.durations)  # FFmpeg's average rate: frames / the table's total duration
  fps = fractions.Fraction(track.timescale * total, sum(c * d for c, d in track.durations))
  answer = {"num_frames": n, "fps": float(fps), "height": track.height, "width": track.width, "matrix": track.matrix}
  return answer, True
