"""Paths that may name a bucket: local folders and `gs://` (or any other `etils.epath` scheme) alike.

Workdirs, model folders and data folders go through `etils.epath.Path`, which reads `gs://` with gcsfs (or TF's
filesystem when `EPATH_USE_TF` is not off and TensorFlow is installed) and local paths with `os`. Orbax checkpoints
take the same paths.

    path("~/runs/a")            # PosixPath('/home/me/runs/a'): local paths are made absolute
    path("gs://bucket/runs/a")  # kept as it is
    write_atomic(path(workdir) / "history.json", text)

Atomic writes: locally a temporary file in the same folder, then `os.replace`; on an object store an object is
created whole when its upload completes, so readers never see a half-written object and the write is direct.
"""
from __future__ import annotations

import io
import os
import uuid

from etils import epath
from etils.epath import backend as epath_backend


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` names an object store (`gs://...`, any `scheme://`) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`: local paths with `~` expanded and made absolute, `scheme://` paths as they are."""
  p = os.fspath(p)
  if not p:
    raise ValueError("expected a path, got an empty string")
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def normalize(p: str | os.PathLike) -> str:
  """`str(path(p))`: the one spelling of a path used for comparisons and messages."""
  return os.fspath(path(p))


def refresh(p: str | os.PathLike) -> None:
  """Forgets the folder listings under `p` that this process's fsspec filesystem cached (gcsfs keeps listings, so
  a folder written since by another process, e.g. a trainer's new checkpoints, would look unchanged). No-op for
  local paths."""
  if not is_remote(p):
    return
  fs = epath_backend.fsspec_backend.fs(os.fspath(p))
  key = fs._strip_protocol(os.fspath(p)).rstrip("/")  # fsspec's spelling of its cache keys
  fs.invalidate_cache(key)  # the folder and its parents
  for cached in [k for k in fs.dircache if k.startswith(key + "/")]:  # and what lies below it
    fs.dircache.pop(cached, None)


def write_atomic(p: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `p` so that readers see the old content or the new, never a part (creates the folder)."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  payload = data.encode() if isinstance(data, str) else bytes(data)
  if is_remote(target):
    target.write_bytes(payload)
    return
  tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
  try:
    tmp.write_bytes(payload)
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def save_figure(fig, p: str | os.PathLike, **savefig_kwargs) -> None:
  """A `matplotlib.figure.Figure` written as the image format of `p`'s extension (PNG by default), atomically."""
  buf = io.BytesIO()
  fmt = os.path.splitext(os.fspath(p))[1].lstrip(".") or "png"
  fig.savefig(buf, format=fmt, **savefig_kwargs)
  write_atomic(p, buf.getvalue())


def save_image(image, p: str | os.PathLike) -> None:
  """A `PIL.Image.Image` written as the format of `p`'s extension, atomically."""
  buf = io.BytesIO()
  image.save(buf, format=os.path.splitext(os.fspath(p))[1].lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
  write_atomic(p, buf.getvalue())


def copy_tree(local_dir: str, target: str | os.PathLike) -> list[str]:
  """Copies every file under the local folder `local_dir` to the same relative path under `target` (local or
  remote), overwriting; returns the relative paths copied."""
  root, copied = path(target), []
  for dirpath, _, filenames in os.walk(local_dir):
    for name in filenames:
      src = os.path.join(dirpath, name)
      rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
      dst = root / rel
      dst.parent.mkdir(parents=True, exist_ok=True)
      with open(src, "rb") as f:
        dst.write_bytes(f.read())
      copied.append(rel)
  return sorted(copied)
