"""Media files: probing and decoding videos (PyAV) and images (Pillow), reading and writing video files.

The input pipeline works on encoded bytes in memory (`probe_video`, `decode_video_frames`; images: `images.py`):
every failure a user's file can cause is raised as `BadInput(reason)`, so that callers can skip the file, count it
and report it once; nothing else in the pipeline needs to know about PyAV or Pillow errors. Frames come out as
uint8 RGB, channels-last: video `[T, H, W, 3]`, image `[H, W, 3]`.

Command lines read and write video files by path (`read_video`, `video_info`, `write_video`): frames as float32
`[T, H, W, 3]` in [-1, 1]; an unreadable file raises `VideoReadError` (a `BadInput` and a `ValueError`) naming the
path and the reason.

    frames = media.read_video("in.mp4", num_frames=17, stride=2, size=(256, 256))
    media.write_video("out.mp4", frames, fps=media.video_info("in.mp4").fps)
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import itertools
import os
from collections.abc import Sequence

import av
import numpy as np

from cvvae_jax.data import rotation

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv",
                    ".wmv", ".flv", ".3gp", ".ts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
EXTENSIONS = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS}

# Frame resampling: swscale's bicubic widens its filter when downscaling, so it antialiases.
_SWS_INTERPOLATION = "BICUBIC"


class BadInput(Exception):
  """A file that cannot be used (unreadable, truncated, empty, wrong kind, too short, ...)."""

  @property
  def reason(self) -> str:
    return str(self)


class VideoReadError(BadInput, ValueError):
  """A video file that cannot be read by path (missing, not a video, no decodable frames, too short)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """A video's frame count (decoded by `probe_video`; as the container declares it, 0 if it does not, by
  `video_info`), frame size and nominal rate."""
  num_frames: int
  height: int
  width: int
  fps: float


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  height: int
  width: int


def resized_shape(height: int, width: int, size: tuple[int, int], short_side: int = 0) -> tuple[int, int]:
  """The frame shape after scaling `height` x `width` so that its short side is `short_side` and it still covers
  the crop `size` (H, W) (with `short_side` 0: the smallest such shape), keeping the aspect ratio."""
  scale = max(short_side / min(height, width), size[0] / height, size[1] / width)
  return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`[..., H, W, C]` -> `[..., h, w, C]`, the central window."""
  h, w = frames.shape[-3:-1]
  if size[0] > h or size[1] > w:
    raise ValueError(f"crop {size} is larger than the frame {(h, w)}")
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return frames[..., top:top + size[0], left:left + size[1], :]


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Videos in memory (the input pipeline).
# ----------------------------------------------------------------------------------------------------

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


def probe_video(data: bytes, *, declared_is_exact: bool = True) -> VideoInfo:
  """Decodes every frame once (no colour conversion) to count the decodable frames.

  A file whose decoder fails part-way, or that decodes fewer frames than its container declares,
  is reported as truncated.

  Args:
    data: the encoded file (mp4, webm, mov, avi, ...).
    declared_is_exact: False where the container's frame count may exceed what it presents (an mp4 edit list that
      starts late: `mp4.probe` has checked that every sample is in the file); then fewer frames are not a cut.
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
          height, width = rotation.displayed_size(frame)
        num_frames += 1
    except av.FFmpegError as e:
      raise BadInput(f"truncated or corrupt: decoding failed after {num_frames} frames ({e})") from None
  if num_frames == 0:
    raise BadInput("no decodable frames")
  if declared and num_frames < declared and declared_is_exact:
    raise BadInput(f"truncated: decoded {num_frames} of the {declared} frames the container declares")
  return VideoInfo(num_frames=num_frames, height=height, width=width, fps=fps)


class FrameClock:
  """Presentation timestamps <-> frame numbers of a constant-rate stream (pts in `time_base` units, counted from
  the stream's `start_time`, which need not be 0)."""

  def __init__(self, stream):
    self.rate = stream.base_rate or stream.guessed_rate or stream.average_rate  # Fraction, frames/s
    self.time_base = stream.time_base
    self.start = stream.start_time or 0
    self.ok = bool(self.rate and self.time_base)
    if self.ok:  # frame number = (pts - start) * num / den, in integers (this runs for every decoded frame)
      self._num = self.time_base.numerator * self.rate.numerator
      self._den = self.time_base.denominator * self.rate.denominator

  def index(self, pts: int | None) -> int | None:
    """The frame number at `pts`, or None if `pts` is not on the frame grid (variable rate, no pts)."""
    if pts is None:
      return None
    x = (pts - self.start) * self._num
    n = (2 * x + self._den) // (2 * self._den)  # nearest integer
    return n if 4 * abs(x - n * self._den) < self._den and n >= 0 else None

  def pts(self, index: int) -> int:
    return self.start + (index * self._den) // self._num


def _rgb(frame, height: int, width: int) -> np.ndarray:
  return rotation.upright_rgb(frame, height, width, _SWS_INTERPOLATION)


def _set_threads(stream, threads: int) -> None:
  if threads != 1:
    stream.thread_type = "AUTO"
    stream.thread_count = max(0, threads)  # 0: as many as FFmpeg likes


def _decoded_after_seek(container, stream, clock: FrameClock, first_wanted: int, seen: set[int]):
  """The frames `container.decode(stream)` gives, except that frames before `first_wanted` that no other frame
  references are not decoded (FFmpeg's `skip_frame="NONREF"`, decided per packet by its own pts: exact). The frame
  number of every packet demuxed is added to `seen` (None where a pts is off the frame grid)."""
  context, skip_before = stream.codec_context, clock.pts(first_wanted)
  try:
    for packet in container.demux(stream):
      if packet.pts is not None:
        seen.add(clock.index(packet.pts))
      context.skip_frame = "NONREF" if packet.pts is not None and packet.pts < skip_before else "DEFAULT"
      yield from stream.decode(packet)
  finally:
    context.skip_frame = "DEFAULT"


def _decode_seeking(data: bytes, indices: list[int], height: int, width: int, threads: int) -> np.ndarray | None:
  """`decode_video_frames` by seeking to the keyframe at or before `indices[0]`; None where that cannot be done
  exactly (no timestamps on the frame grid, variable rate, seek failed), so that the caller decodes from the start.

  Frames are identified by their pts; decoding starts at the first keyframe the seek lands on (frames a decoder
  puts out before it, e.g. open-GOP leading B-frames, are not used). If that keyframe is after `indices[0]` (some
  demuxers seek by decode time), the seek is retried 2, 8 and 32 s earlier. Non-reference frames before
  `indices[0]` are not decoded (`_decoded_after_seek`); the packets' timestamps must still cover every frame number
  from the keyframe to `indices[-1]` (a constant-rate stream), else None.
  """
  out = np.empty((len(indices), height, width, 3), np.uint8)
  with _open_video(data) as container:
    stream = container.streams.video[0]
    clock = FrameClock(stream)
    if not clock.ok:
      return None
    _set_threads(stream, threads)
    for back_s in (0, 2, 8, 32):
      target = indices[0] - int(back_s * clock.rate)
      if target <= 0:
        return None  # decoding from the start is the same work
      try:
        container.seek(clock.pts(target), stream=stream, backward=True, any_frame=False)
      except (av.FFmpegError, OverflowError, ValueError):
        return None
      filled, first, previous, seen = 0, None, None, set()
      try:
        for frame in _decoded_after_seek(container, stream, clock, indices[0], seen):
          if first is None and not frame.key_frame:
            continue
          index = clock.index(frame.pts)
          if index is None or (previous is not None and index <= previous):
            return None  # not a constant-rate stream here: frame numbers only by counting from the start
          if first is None:
            first = index
            if index > indices[0]:
              break  # landed after the first wanted frame: seek further back
          if index > indices[filled]:
            return None  # a wanted frame number never came: not a constant-rate stream
          previous = index
          if index == indices[filled]:
            out[filled] = _rgb(frame, height, width)
            filled += 1
            if filled == len(indices):
              return out if seen.issuperset(range(first, indices[-1] + 1)) else None
      except av.FFmpegError as e:
        raise BadInput(f"truncated or corrupt: decoding failed after frame {previous} ({e})") from None
      if first is None:
        return None  # no frame flagged as a keyframe after the seek (e.g. intra refresh): count from the start
      if first <= indices[0]:
        raise BadInput(f"truncated: needed frame {indices[-1]}, the stream ended after "
                       f"{(previous or 0) + 1} frames")
  return None


def decode_video_frames(data: bytes, indices: Sequence[int], height: int, width: int, *,
                        threads: int = 1, seek: bool = True) -> np.ndarray:
  """Decodes the frames at `indices` (strictly increasing), resized to `height` x `width`.

  With `seek` (the default) decoding starts at the keyframe at or before `indices[0]` (frames identified by
  pts, which may start anywhere), so the cost grows with the clip's length and the GOP size, not with its position
  in the file. Where the stream's timestamps are not on a constant frame grid (or carry none) it decodes from the
  start and counts frames, as with `seek=False`; both give the same frames bit for bit. Frames that are not wanted
  are never converted.

  Args:
    data: the encoded file.
    indices: frame numbers in presentation order, strictly increasing.
    height, width: output frame size (swscale bicubic, antialiased when downscaling).
    threads: codec threads for this one decode (1: parallelism comes from decoding several clips; 0: FFmpeg's
      choice).
    seek: seek to the first wanted frame's keyframe (False: decode from the start).
  Returns:
    uint8 `[len(indices), height, width, 3]`, RGB.
  Raises:
    BadInput: unreadable file, or fewer frames than `indices[-1] + 1` (a file whose index or metadata claimed
      more frames is caught here).
  """
  indices = [int(i) for i in indices]
  if not indices or indices[0] < 0 or any(b <= a for a, b in itertools.pairwise(indices)):
    raise ValueError(f"expected strictly increasing frame indices >= 0, got {indices}")
  if seek and indices[0] > 0:
    out = _decode_seeking(data, indices, height, width, threads)
    if out is not None:
      return out
  out = np.empty((len(indices), height, width, 3), np.uint8)
  filled, frame_number = 0, -1
  with _open_video(data) as container:
    stream = container.streams.video[0]
    _set_threads(stream, threads)
    try:
      for frame_number, frame in enumerate(container.decode(stream)):
        if frame_number == indices[filled]:
          out[filled] = _rgb(frame, height, width)
          filled += 1
          if filled == len(indices):
            break
    except av.FFmpegError as e:
      raise BadInput(f"truncated or corrupt: decoding failed at frame {frame_number + 1} ({e})") from None
  if filled < len(indices):
    raise BadInput(f"truncated: needed frame {indices[-1]}, the stream ended after "
                   f"{frame_number + 1} frames")
  return out


# ----------------------------------------------------------------------------------------------------
# Video files by path (command lines).
# ----------------------------------------------------------------------------------------------------

def _open_file(path: str):
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
  """Frame count (declared), size as displayed (`rotation.py`) and frame rate of a video file, without decoding it
  (except one frame of a Matroska/WebM file, for its rotation)."""
  with _open_file(path) as container, open(path, "rb") as f:
    stream = container.streams.video[0]
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    degrees = rotation.container_rotation(f)
    height, width = stream.codec_context.height, stream.codec_context.width
    if rotation.swaps_size(rotation.decoded_rotation(container, stream) if degrees is None else degrees):
      height, width = width, height
    return VideoInfo(num_frames=int(stream.frames or 0), height=height, width=width, fps=fps)


def _pair(size) -> tuple[int, int] | None:
  if size is None:
    return None
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


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
  with _open_file(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
      for index, frame in enumerate(container.decode(stream)):
        if index < start or (index - start) % stride:
          continue
        height, width = rotation.displayed_size(frame)
        if size is not None:
          rgb = center_crop(_rgb(frame, *resized_shape(height, width, size)), size)
        else:
          rgb = _rgb(frame, height, width)
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


# ----------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------

_NTSC_RATES = (24, 30, 48, 60, 120, 240)  # written as n * 1000 / 1001 when given as a rounded float (29.97)


def rational_rate(fps: float | fractions.Fraction) -> fractions.Fraction:
  """A frame rate as the exact fraction a container stores: Fractions as given; floats within 0.005 of an NTSC
  rate n * 1000 / 1001 (23.976, 29.97, 59.94, ...) as that rate; other floats as the nearest fraction with a
  denominator <= 1001 (25.0 -> 25, 12.5 -> 25/2)."""
  if isinstance(fps, fractions.Fraction):
    return fps
  for n in _NTSC_RATES:
    if abs(fps - n / 1.001) < 5e-3:
      return fractions.Fraction(n * 1000, 1001)
  return fractions.Fraction(fps).limit_denominator(1001)


def write_video(path: str, frames: np.ndarray, *, fps: float | fractions.Fraction = 24.0, codec: str = "libx264",
                options: dict[str, str] | None = None, faststart: bool = False, gop_size: int | None = None,
                display_rotation: int = 0) -> str:
  """Writes frames `[T, H, W, 3]` (float in [-1, 1], or uint8) to a video file; H and W must be even (yuv420p).

  Args:
    path: output file, e.g. "clip.mp4" (the container comes from the extension); its folder is created.
    frames: RGB frames.
    fps: frame rate, kept exactly (`rational_rate`: 29.97 and 30000/1001 are both written as 30000/1001).
    codec: PyAV encoder name ("libx264", "mpeg4", "libvpx", ...).
    options: encoder options (default for libx264: {"crf": "18"}).
    faststart: put the mp4 index in front (as web videos do), so that a cut file still opens.
    gop_size: frames between keyframes (None: the encoder's default, 250 for libx264).
    display_rotation: a display matrix turning the frames this many degrees counter-clockwise when shown (as phones
      write; `rotation.py`); the frames are stored as given.
  Returns:
    The path.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"expected even H and W (yuv420p), got H={frames.shape[1]}, W={frames.shape[2]}")
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  if options is None:
    options = {"crf": "18"} if codec == "libx264" else {}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  container_options = {"movflags": "+faststart"} if faststart else {}
  with av.open(path, mode="w", options=container_options) as container:
    stream = container.add_stream(codec, rate=rational_rate(fps) if fps and fps > 0 else 24)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = dict(options)
    if gop_size:
      stream.codec_context.gop_size = int(gop_size)
    if display_rotation:
      stream.set_display_rotation(display_rotation)
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path
