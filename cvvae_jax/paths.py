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
