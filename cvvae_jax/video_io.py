"""Reading and writing video files with PyAV: frames as float32 `[T, H, W, 3]` in [-1, 1].

    frames = video_io.read_video("in.mp4", num_frames=17, stride=2, size=(256, 256))
    video_io.write_video("out.mp4", frames, fps=video_io.video_info("in.mp4").fps)

Errors: `VideoReadError` (a `ValueError`) for a missing, unreadable or empty file, with the path and the reason.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import av
import numpy as np


class VideoReadError(ValueError):
  """A video file that cannot be read (missing, not a video, no decodable frames, too short)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  num_frames: int  # as declared by the container (0 when it does not say)
  height: int
  width: int
  fps: float


def _open(path: str):
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoReadError(f"no such video file: {path}")
  if os.path.isdir(path):
    raise VideoReadError(f"expected a video file, got a directory: {path}")
  try:
    container = av.open(path, mode="r")
  except av.EOFError:
    raise VideoReadError(f"{path} is an empty video: it ends before its first frame") from None
  except (av.FFmpegError, OSError) as e:
    raise VideoReadError(f"cannot read {path} as a video: {e}") from None
  if not container.streams.video:
    container.close()
    raise VideoReadError(f"{path} has no video stream (no frame)")
  return container


def video_info(path: str) -> VideoInfo:
  """Frame count (declared), size and frame rate of a video file, without decoding it."""
  with _open(path) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    return VideoInfo(num_frames=int(stream.frames or 0), height=stream.codec_context.height,
                     width=stream.codec_context.width, fps=fps)


def _pair(size) -> tuple[int, int] | None:
  if size is None:
    return None
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def resized_shape(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
  """The smallest (h, w) with the frame's aspect ratio that covers `size` (to be center-cropped to it)."""
  scale = max(size[0] / height, size[1] / width)
  return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`[..., H, W, C]` -> `[..., h, w, C]`, the central window."""
  h, w = frames.shape[-3:-1]
  if size[0] > h or size[1] > w:
    raise ValueError(f"crop {size} is larger than the frame {(h, w)}")
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return frames[..., top:top + size[0], left:left + size[1], :]


def read_video(path: str, *, num_frames: int | None = None, stride: int = 1, start: int = 0,
               size: int | Sequence[int] | None = None, crop: int | Sequence[int] | None = None) -> np.ndarray:
  """Decodes frames `start, start + stride, ...` (at most `num_frames`) of a video file.

  Args:
    path: a video file PyAV can read (mp4, webm, mov, ...).
    num_frames: how many frames to return at most (None: all).
    stride: keep every `stride`-th frame.
    start: first frame to keep.
    size: `(H, W)` (or an int for a square): resize (bicubic) to cover it keeping the aspect ratio, then
      center-crop to exactly `(H, W)`.
    crop: center-crop to `(H, W)` without resizing (applied after `size` if both are given).
  Returns:
    float32 `[T, H, W, 3]` RGB in [-1, 1], T >= 1.
  Raises:
    VideoReadError: missing or unreadable file, no video stream, or no decodable frame in the requested range.
  """
  if stride < 1 or start < 0 or (num_frames is not None and num_frames < 1):
    raise ValueError(f"expected stride >= 1, start >= 0, num_frames >= 1 or None; got stride={stride}, "
                     f"start={start}, num_frames={num_frames}")
  size, crop = _pair(size), _pair(crop)
  frames = []
  with _open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
      for index, frame in enumerate(container.decode(stream)):
        if index < start or (index - start) % stride:
          continue
        if size is not None:
          h, w = resized_shape(frame.height, frame.width, size)
          rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")
          rgb = center_crop(rgb, size)
        else:
          rgb = frame.to_ndarray(format="rgb24")
        frames.append(rgb)
        if num_frames is not None and len(frames) == num_frames:
          break
    except av.FFmpegError as e:
      if not frames:
        raise VideoReadError(f"cannot decode {path}: {e}") from None
  if not frames:
    raise VideoReadError(f"{path}: no decodable frame from frame {start} on (stride {stride})")
  video = np.stack(frames)
  if crop is not None:
    video = center_crop(video, crop)
  return video.astype(np.float32) / 127.5 - 1.0


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, *, fps: float = 24.0, codec: str = "libx264", crf: int = 18) -> str:
  """Writes `[T, H, W, 3]` frames (float in [-1, 1], or uint8) to a video file; H and W must be even (yuv420p).

  Returns the path. The container comes from the extension (.mp4, .mkv, ...).
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"expected even H and W (yuv420p), got H={frames.shape[1]}, W={frames.shape[2]}")
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rate = max(1, round(fps)) if fps else 24
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": str(crf)}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path
