"""Display rotation of videos: phones record landscape-coded frames and store how to turn them upright in a display
matrix (ISO-BMFF `tkhd`, FFmpeg's DISPLAYMATRIX side data). Every reader here turns frames upright, so a portrait
clip is portrait everywhere: in the folder index (height and width as displayed), in clips and in reconstructions.

Angles follow FFmpeg (`av_display_rotation_get`, PyAV's `VideoFrame.rotation`): degrees by which the display
rotates the coded frame counter-clockwise, in (-180, 180]. Only quarter turns are applied; flips in the matrix
(rare: mirrored front cameras) are not.

Probing reads it without decoding from mp4/mov/m4v/3gp files (the first video track's header, `mp4.py`: the track
FFmpeg lists first), from the first decoded frame of Matroska/WebM files (which carry it since FFmpeg 7.1), and
takes 0 for other containers, which have no display matrix.
"""
from __future__ import annotations

import math
from typing import BinaryIO

import av
import numpy as np

from cvvae_jax.data import mp4


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


def displayed_size(frame: av.VideoFrame) -> tuple[int, int]:
  """(height, width) of a decoded frame as displayed (its display matrix applied)."""
  return (frame.width, frame.height) if swaps_size(frame.rotation) else (frame.height, frame.width)


def upright_rgb(frame: av.VideoFrame, height: int, width: int, interpolation: str) -> np.ndarray:
  """A decoded frame upright, resized (swscale `interpolation`) to `height` x `width` as displayed: uint8
  `[height, width, 3]` RGB."""
  degrees = frame.rotation
  if swaps_size(degrees):
    height, width = width, height  # resized as coded, then turned
  rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation)
  return upright(rgb, degrees)


def matrix_rotation(matrix: tuple[int, ...]) -> float:
  """FFmpeg's `av_display_rotation_get` of a 3x3 display matrix (row-major, a b u c d v x y w, 16.16 fixed)."""
  a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
  scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
  if not scale_x or not scale_y:
    return 0.0
  degrees = -math.degrees(math.atan2(b / scale_y, a / scale_x)) + 0.0  # + 0.0: no -0.0
  return degrees + 360.0 if degrees <= -180.0 else degrees


def container_rotation(f: BinaryIO) -> float | None:
  """The display rotation of the first video track of an mp4/mov file object (read from its header, no decoding;
  `f` is left at an undefined position); 0 without a matrix, None when `f` is not an ISO-BMFF file or has no video
  track (then the rotation is unknown until a frame is decoded)."""
  return track_rotation(mp4.video_track(f))


def track_rotation(track: mp4.VideoTrack | None) -> float | None:
  """The display rotation of an mp4/mov video track's header (`mp4.video_track`): 0 without a matrix, None without
  a track."""
  if track is None:
    return None
  return matrix_rotation(track.matrix) if track.matrix else 0.0


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
