"""Folders of media files: listing them (recursively, sorted) and probing each file (container metadata confirmed
by the last GOP; see `probe_video_file`).

Both readers of a user's folder probe with `probe`/`probe_video_file`: the folder index (`index.py`, which
`sources.FolderSource` reads, for training and evaluation on the folder directly) and the TFDS builders
(`builders.py`, through `scan_folder`, which prepare it once), so a folder and its TFDS copy hold the same files
in the same order, bad files left out by the same probe. Folders may be local or on a bucket
(`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import av

from cvvae_jax import paths
from cvvae_jax.data import images, media, mp4, rotation
from cvvae_jax.data.sampling import Kind


def list_files(root: str) -> list[str]:
  """All files under `root` (local or `gs://...`), recursively, as sorted relative POSIX paths (hidden dirs
  skipped)."""
  if paths.is_remote(root):
    return _list_remote(paths.path(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"expected a folder of media files, got {root!r}, which "
                            f"{'is not a folder' if os.path.exists(root) else 'does not exist'}")
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(out)


def _list_remote(root) -> list[str]:
  """`list_files` of a bucket folder (an `epath.Path`): the objects under its prefix."""
  if not root.is_dir():
    raise FileNotFoundError(f"expected a folder of media files, got {os.fspath(root)!r}, which "
                            f"{'is not a folder' if root.exists() else 'does not exist'}")
  def key(p) -> str:  # "bucket/a/b" whether or not the backend's walk keeps the "gs://"
    return os.fspath(p).split("://", 1)[-1].strip("/")

  out, prefix = [], key(root)
  for dirpath, dirnames, filenames in root.walk():
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel_dir = key(dirpath)[len(prefix):].strip("/")
    out.extend(f"{rel_dir}/{name}" if rel_dir else name for name in filenames)
  return sorted(out)


def folder_kind(root: str) -> str:
  """"video" when `root` holds any video file, else "image" when it holds images; ValueError when neither."""
  exts = [os.path.splitext(f)[1].lower() for f in list_files(root)]
  if any(e in media.VIDEO_EXTENSIONS for e in exts):
    return "video"
  if any(e in media.IMAGE_EXTENSIONS for e in exts):
    return "image"
  raise ValueError(f"--data {root}: expected a folder of videos ({', '.join(media.VIDEO_EXTENSIONS)}) or images "
                   f"({', '.join(media.IMAGE_EXTENSIONS)}), found {len(exts)} file(s) of neither kind")


def read_file(root: str, rel: str) -> bytes:
  """The bytes of `root/rel` (local or remote)."""
  if paths.is_remote(root):
    return (paths.path(root) / rel).read_bytes()
  with open(os.path.join(root, rel), "rb") as f:
    return f.read()


def _last_frame_index(container, stream, clock: media.FrameClock, estimate: int, decode: bool) -> int | None:
  """The frame number of the stream's last frame: seeks to the keyframe before frame `estimate - 1` and reads the
  packets from there to the end (with `decode`, decodes them too and uses the frames' timestamps). None if the
  timestamps are off the frame grid."""
  target = max(0, estimate - 1)
  if target > 0:
    container.seek(clock.pts(target), stream=stream, backward=True, any_frame=False)
  packets = [p for p in container.demux(stream) if p.size]
  first_key = next((i for i, p in enumerate(packets) if p.is_keyframe), None)
  if first_key is None:
    return None
  packets = packets[first_key:]
  if decode:
    frames = [f for p in [*packets, None] for f in stream.decode(p)]
    timestamps = [f.pts for f in frames[next((i for i, f in enumerate(frames) if f.key_frame), 0):]]
  else:
    timestamps = [p.pts for p in packets]
  numbers = sorted(clock.index(t) if t is not None else -1 for t in timestamps)
  if not numbers or numbers[0] < 0 or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
    return None
  return numbers[-1]


def probe_video_file(f, *, decode_last: bool = False, read_header: bool = True) -> dict[str, Any]:
  """{"num_frames", "fps", "height", "width"} (as displayed) of an open video file (a binary file object, read only
  where needed).

  An mp4/mov file whose sample table ends past the file's end is caught first (`mp4.py`). With `read_header` (and
  not `decode_last`), one whose header states all of it exactly is answered from the header alone (no FFmpeg).
  Otherwise the frame count is the container's (the stream's, else duration x rate), confirmed by the timestamps of the
  packets of the last GOP (seek, then demux to the end): a file that ends early is caught here. With `decode_last`
  the last GOP is decoded too (slower: a 10 s GOP decodes 10 s); without it, damage inside the stream is caught
  when a clip is decoded (the pipeline skips and counts the file then). Streams whose timestamps are off a
  constant frame grid are decoded in full (`media.probe_video`).

  Raises:
    media.BadInput: unreadable, no video stream, truncated (ends before the frame count its container declares).
  """
  if not f.read(1):
    raise media.BadInput("empty file (0 bytes)")
  track = mp4.video_track(f)  # mp4/mov: the header, read once (None for other containers)
  try:  # `complete`: an mp4/mov whose samples all lie in the file (fewer frames than samples come from its edits)
    header, complete = mp4.probe_track(track, f)
  except mp4.Truncated as e:
    raise media.BadInput(str(e)) from None
  degrees = rotation.track_rotation(track)
  if header is not None and read_header and not decode_last:  # the header states it all exactly: no FFmpeg
    del header["matrix"]
    if rotation.swaps_size(degrees):
      header["height"], header["width"] = header["width"], header["height"]
    return header
  f.seek(0)
  try:
    container = av.open(f, mode="r")
  except (av.FFmpegError, OSError) as e:
    raise media.BadInput(f"unreadable as video: {e}") from None
  with container:
    if not container.streams.video:
      raise media.BadInput("no video stream")
    stream = container.streams.video[0]
    if degrees is None:
      degrees = rotation.decoded_rotation(container, stream)
    clock = media.FrameClock(stream)
    declared = int(stream.frames or 0)
    height, width = stream.codec_context.height, stream.codec_context.width
    fps = float(stream.average_rate or clock.rate or 0)
    estimate = declared
    if not estimate and clock.ok:
      seconds = (float(stream.duration * stream.time_base) if stream.duration
                 else (container.duration or 0) / av.time_base)
      estimate = int(seconds * float(clock.rate))
    last = None
    if clock.ok and height and width and estimate:
      try:
        last = _last_frame_index(container, stream, clock, estimate, decode_last)
      except av.FFmpegError as e:
        raise media.BadInput(f"truncated or corrupt: decoding the last frames failed ({e})") from None
      except (OverflowError, ValueError):
        last = None
  if last is None:  # no usable metadata: count by decoding every frame
    f.seek(0)
    info = media.probe_video(f.read(), declared_is_exact=not complete)
    return {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width}
  if declared and last + 1 < declared and not complete:
    raise media.BadInput(f"truncated: the container declares {declared} frames, the stream ends after {last + 1}")
  if rotation.swaps_size(degrees):
    height, width = width, height
  return {"num_frames": last + 1, "fps": fps, "height": height, "width": width}


def probe_image_file(f) -> dict[str, Any]:
  """{"height", "width"} (after EXIF orientation) from an image file's header."""
  image = images.open_image(f.read())
  height, width = images.oriented_size(image)
  return {"height": height, "width": width}


def probe(kind: Kind, data: bytes) -> dict[str, Any]:
  """Metadata stored with a record (the same probe as the folder index's); raises media.BadInput for files that
  must be skipped."""
  return (probe_video_file if kind is Kind.VIDEO else probe_image_file)(io.BytesIO(data))


def scan_folder(root: str, kind: Kind, *, workers: int = 4,
                on_skip: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
  """Yields a record (with the file's bytes) for each usable file under `root`, in sorted order.

  Files with an extension that is not a `kind` extension, and files whose probe fails, are passed
  to `on_skip(path, reason)` and left out. Probing runs in `workers` threads (PyAV and Pillow
  release the GIL while decoding).
  """
  extensions = media.EXTENSIONS[kind.value]
  candidates = []
  for rel in list_files(root):
    ext = os.path.splitext(rel)[1].lower()
    if ext in extensions:
      candidates.append(rel)
    else:
      on_skip(os.path.join(root, rel),
              f"unsupported extension {ext or '(none)'!r} for a {kind.value} folder "
              f"(expected one of {', '.join(extensions)})")

  def load(rel: str):
    try:
      data = read_file(root, rel)
      return rel, data, probe(kind, data), None
    except media.BadInput as e:
      return rel, None, None, e.reason
    except Exception as e:  # noqa: BLE001  (a bad file must never stop a run)
      return rel, None, None, f"unreadable ({type(e).__name__}: {e})"

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    # Bounded look-ahead keeps memory flat on large folders while keeping the order.
    pending: list[concurrent.futures.Future] = []
    it = iter(candidates)
    for rel in it:
      pending.append(pool.submit(load, rel))
      if len(pending) >= 4 * max(1, workers):
        break
    while pending:
      rel, data, meta, reason = pending.pop(0).result()
      nxt = next(it, None)
      if nxt is not None:
        pending.append(pool.submit(load, nxt))
      if reason is not None:
        on_skip(os.path.join(root, rel), reason)
      else:
        yield {"key": rel, "data": data, **meta}
