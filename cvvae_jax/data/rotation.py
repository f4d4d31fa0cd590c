"""Display rotation of videos: phones record landscape-coded frames and store how to turn them upright in a display
matrix (ISO-BMFF `tkhd`, FFmpeg's DISPLAYMATRIX side data). Every reader here turns frames upright, so a portrait
clip is portrait everywhere: in the folder index (height and width as displayed), in clips and in reconstructions.

Angles follow FFmpeg (`av_display_rotation_get`, PyAV's `VideoFrame.rotation`): degrees by which the display
rotates the coded frame counter-clockwise, in (-180, 180]. Only quarter turns are applied; flips in the matrix
(rare: mirrored front cameras) are not.

Probing reads it without decoding from mp4/mov/m4v/3gp files (the first video track's header, the
track FFmpeg lists first), from the first decoded frame of Matroska/WebM files (which carry it since FFmpeg 7.1), and
takes 0 for other containers, which have no display matrix.
"""
from __future__ import annotations

import math
import struct
from typing import BinaryIO, Iterator

import av
import numpy as np

_ISO_BMFF_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin")
_MAX_HEADER_BYTES = 1 << 16  # a tkhd or hdlr box is ~100 bytes: read no more than this of one


def quarter_turns(degrees: float) -> int:
  """Counter-clockwise quarter turns (0-3) of a display rotation in degrees (nearest quarter)."""
  return int(round(float(degrees) / 90.0)) % 4


def swaps_size(degrees: float) -> bool:
  """Whether the displayed frame has the coded frame's height and width swapped."""
  return quarter_turns(degrees) % 2 == 1


def upright(rgb: np.ndarray, degrees: float) -> np.ndarray:
  """A decoded `[H, W, C]` frame turned as its display matrix says (`[W, H, C]` for a quarter turn)."""
  turns = quarter_turns(degrees)
  return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def matrix_rotation(matrix: tuple[int, ...]) -> float:
  """FFmpeg's `av_display_rotation_get` of a 3x3 display matrix (row-major, a b u c d v x y w, 16.16 fixed)."""
  a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
  scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
  if not scale_x or not scale_y:
    return 0.0
  degrees = -math.degrees(math.atan2(b / scale_y, a / scale_x)) + 0.0  # + 0.0: no -0.0
  return degrees + 360.0 if degrees <= -180.0 else degrees


def _boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
  """(type, payload start, box end) of the ISO-BMFF boxes in bytes [start, end) of `f`."""
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
      return  # damaged: stop here (the decoder reports damage where it matters)
    yield kind, pos + header, min(pos + size, end)
    pos += size


def _payload(f: BinaryIO, start: int, end: int) -> bytes:
  f.seek(start)
  return f.read(min(end - start, _MAX_HEADER_BYTES))


def _track(f: BinaryIO, start: int, end: int) -> tuple[bool, float]:
  """(is a video track, its display rotation) of one `trak` box."""
  video, degrees = False, 0.0
  for kind, a, b in _boxes(f, start, end):
    if kind == b"tkhd":
      body = _payload(f, a, b)
      offset = 52 if body[:1] == b"\x01" else 40  # version 1 has 64-bit times and duration
      if len(body) >= offset + 36:
        degrees = matrix_rotation(struct.unpack(">9i", body[offset:offset + 36]))
    elif kind == b"mdia":
      for kind2, a2, b2 in _boxes(f, a, b):
        if kind2 == b"hdlr":
          video = _payload(f, a2, b2)[8:12] == b"vide"
  return video, degrees


def container_rotation(f: BinaryIO) -> float | None:
  """The display rotation of the first video track of an mp4/mov file object (read from its header boxes, no
  decoding; `f` is left at an undefined position); 0 without a matrix, None when `f` is not an ISO-BMFF file or
  has no video track (then the rotation is unknown until a frame is decoded)."""
  f.seek(0, 2)
  end = f.tell()
  f.seek(4)
  if f.read(4) not in _ISO_BMFF_FIRST_BOXES:
    return None
  for kind, a, b in _boxes(f, 0, end):
    if kind == b"moov":
      for kind2, a2, b2 in _boxes(f, a, b):
        if kind2 == b"trak":
          video, degrees = _track(f, a2, b2)
          if video:
            return degrees
      return None
  return None


def decoded_rotation(container, stream) -> float:
  """For a container whose header gave none (`container_rotation` None): the rotation of `stream`'s first frame if
  the container is Matroska/WebM (decoding one frame; the caller seeks afterwards), else 0 (no display matrix)."""
  if "matroska" not in container.format.name:
    return 0.0
  try:
    for frame in container.decode(stream):
      return float(frame.rotation)
  except av.FFmpegError:
    pass  # a file that does not decode is reported by the probe itself
  return 0.0
