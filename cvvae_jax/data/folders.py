"""Folders of media files: listing them (recursively, sorted) and probing each file once, in threads.

`scan_folder` is what both readers of a user's folder share: `sources.FolderSource` (training and evaluation read
the folder directly) and the TFDS builders (`builders.py`, which prepare it once), so a folder and its TFDS copy
hold the same files in the same order, bad files left out by the same probe. Folders may be local or on a bucket
(`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator
from typing import Any

from cvvae_jax import paths
from cvvae_jax.data import images, media
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


def read_file(root: str, rel: str) -> bytes:
  """The bytes of `root/rel` (local or remote)."""
  if paths.is_remote(root):
    return (paths.path(root) / rel).read_bytes()
  with open(os.path.join(root, rel), "rb") as f:
    return f.read()


def probe(kind: Kind, data: bytes) -> dict[str, Any]:
  """Metadata stored with a record; raises media.BadInput for files that must be skipped."""
  if kind is Kind.VIDEO:
    info = media.probe_video(data)
    return {"num_frames": info.num_frames, "height": info.height, "width": info.width,
            "fps": info.fps}
  info = images.probe_image(data)
  return {"height": info.height, "width": info.width}


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
    except Exception as e:  # pylint: disable=broad-except  (a bad file must never stop a run)
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
