"""Probing and decoding of video files (PyAV) and image files (Pillow), from bytes in memory.

Every failure a user's file can cause is raised as `BadInput(reason)`, so that callers can skip the
file, count it and report it once; nothing else in the pipeline needs to know about PyAV or Pillow
errors. Frames come out as uint8 RGB, channels-last: video `[T, H, W, 3]`, image `[H, W, 3]`.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import av
import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv",
                    ".wmv", ".flv", ".3gp", ".ts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
EXTENSIONS = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS}

# Frame resampling: swscale's bicubic widens its filter when downscaling, so it antialiases.
_SWS_INTERPOLATION = "BICUBIC"
_PIL_RESAMPLE = Image.Resampling.BICUBIC


class BadInput(Exception):
  """A file that cannot be used (unreadable, truncated, empty, wrong kind, too short, ...)."""

  @property
  def reason(self) -> str:
    return str(self)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What probing a video found: decodable frames, frame size and nominal rate."""
  num_frames: int
  height: int
  width: int
  fps: float


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  height: int
  width: int


def _open_video(data: bytes):
  if not data:
    raise BadInput("empty file (0 bytes)")
  try:
    container = av.open(io.BytesIO(data), mode="r")
  except av.FFmpegError as e:
    raise BadInput(f"unreadable as video: {e}") from None
  if not container.streams.video:
    container.close()
    raise BadInput("no video stream")
  return container


def probe_video(data: bytes) -> VideoInfo:
  """Decodes every frame once (no colour conversion) to count the decodable frames.

  A file whose decoder fails part-way, or that decodes fewer frames than its container declares,
  is reported as truncated.

  Args:
    data: the encoded file (mp4, webm, mov, avi, ...).
  Returns:
    VideoInfo with the number of decodable frames and the frame size.
  Raises:
    BadInput: empty, unreadable, without video stream, without decodable frames, or truncated.
  """
  container = _open_video(data)
  with container:
    stream = container.streams.video[0]
    declared = stream.frames
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    num_frames, height, width = 0, 0, 0
    try:
      for frame in container.decode(stream):
        if num_frames == 0:
          height, width = frame.height, frame.width
        num_frames += 1
    except av.FFmpegError as e:
      raise BadInput(f"truncated or corrupt: decoding failed after {num_frames} frames ({e})") from None
  if num_frames == 0:
    raise BadInput("no decodable frames")
  if declared and num_frames < declared:
    raise BadInput(f"truncated: decoded {num_frames} of the {declared} frames the container declares")
  return VideoInfo(num_frames=num_frames, height=height, width=width, fps=fps)


def decode_video_frames(data: bytes, indices: Sequence[int], height: int, width: int, *,
                        threads: int = 1) -> np.ndarray:
  """Decodes the frames at `indices` (strictly increasing), resized to `height` x `width`.

  Decoding runs from the start of the stream up to the last index (no seeking, so the cost grows
  with the last index, not with the clip length); frames that are not wanted are never converted.

  Args:
    data: the encoded file.
    indices: frame numbers in presentation order, strictly increasing.
    height, width: output frame size (swscale bicubic, antialiased when downscaling).
    threads: codec threads for this one decode (1: parallelism comes from decoding several clips).
  Returns:
    uint8 `[len(indices), height, width, 3]`, RGB.
  Raises:
    BadInput: unreadable file, or fewer frames than `indices[-1] + 1`.
  """
  indices = [int(i) for i in indices]
  if not indices or any(b <= a for a, b in zip(indices, indices[1:])):
    raise ValueError(f"expected strictly increasing frame indices, got {indices}")
  out = np.empty((len(indices), height, width, 3), np.uint8)
  container = _open_video(data)
  filled, frame_number = 0, -1
  with container:
    stream = container.streams.video[0]
    if threads != 1:
      stream.thread_type = "AUTO"
      stream.thread_count = threads
    try:
      for frame_number, frame in enumerate(container.decode(stream)):
        if frame_number == indices[filled]:
          out[filled] = frame.to_ndarray(format="rgb24", width=width, height=height,
                                         interpolation=_SWS_INTERPOLATION)
          filled += 1
          if filled == len(indices):
            break
    except av.FFmpegError as e:
      raise BadInput(f"truncated or corrupt: decoding failed at frame {frame_number + 1} ({e})") from None
  if filled < len(indices):
    raise BadInput(f"truncated: needed frame {indices[-1]}, the stream ended after "
                   f"{frame_number + 1} frames")
  return out


def open_rgb_image(data: bytes) -> Image.Image:
  """Opens an image lazily (header only) and checks that it is 8-bit RGB.

  Raises:
    BadInput: empty, unreadable, or not RGB (grayscale, alpha, palette, CMYK, 16-bit ...).
  """
  if not data:
    raise BadInput("empty file (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise BadInput(f"unreadable as image: {e}") from None
  if image.mode != "RGB":
    raise BadInput(f"expected an RGB image, got mode {image.mode!r} (grayscale/alpha/palette images "
                   "are skipped)")
  return image


def load_image(image: Image.Image, height: int, width: int) -> np.ndarray:
  """Decodes an image opened by `open_rgb_image` and resizes it to `height` x `width`.

  JPEGs are decoded at a reduced DCT scale when that still covers the target size (Pillow `draft`).

  Returns:
    uint8 `[height, width, 3]`.
  Raises:
    BadInput: truncated or corrupt data.
  """
  try:
    image.draft("RGB", (width, height))
    image.load()
    if image.size != (width, height):
      image = image.resize((width, height), _PIL_RESAMPLE)
    return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(f"truncated or corrupt image: {e}") from None


def probe_image(data: bytes) -> ImageInfo:
  """Opens and fully decodes an image to check it (RGB, not truncated)."""
  image = open_rgb_image(data)
  size = image.size
  try:
    image.load()
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(f"truncated or corrupt image: {e}") from None
  return ImageInfo(height=size[1], width=size[0])


def encode_video(frames: np.ndarray, path: str, *, fps: int = 25, codec: str = "libx264",
                 options: dict[str, str] | None = None, faststart: bool = False) -> None:
  """Writes uint8 frames `[T, H, W, 3]` (H, W even) to a video file (container from the extension).

  Args:
    frames: RGB frames.
    path: output file, e.g. "clip.mp4".
    fps: frame rate.
    codec: PyAV encoder name ("libx264", "mpeg4", "libvpx", ...).
    options: encoder options, e.g. {"crf": "18"}.
    faststart: put the mp4 index in front (as web videos do), so that a cut file still opens.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"expected even H and W for yuv420p, got {frames.shape[1:3]}")
  container_options = {"movflags": "+faststart"} if faststart else {}
  with av.open(path, mode="w", options=container_options) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = dict(options or {})
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
