"""Checkpoint integrity: the checksums each saved step records, their verification, damaged steps moved aside, and
the one-line reasons of faults a save meets.

Every committed step `<workdir>/checkpoints/<step>/` gets `checksums.json` once its save is complete:

    {"algorithm": "crc32c", "files": {"state/ocdbt.process_0/d/2f0c...": {"size": 1000, "crc32c": "8a9136aa"}, ...}}

one entry per file Orbax wrote (paths relative to the step folder), computed from the files as they lie in the
workdir (local or `gs://`). `verify_step` reads every listed file again and raises `CheckpointIntegrityError` naming
the step and the first file that is missing, of another size or of another checksum. A step saved before
checksums existed (or whose save stopped between its commit and the checksums) has no `checksums.json`: it is
reported as unverified, not as damaged.

A damaged step is never deleted: `move_aside` renames `<step>` to `<step>.corrupt` (`.corrupt.1`, ... when taken),
a name Orbax does not read as a step, so it is neither restored nor counted by `keep_checkpoints`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
from typing import Any

import google_crc32c
from etils import epath
from etils.epath import backend as epath_backend

from cvvae_jax import paths

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "crc32c"
CORRUPT_SUFFIX = ".corrupt"
_CHUNK = 16 << 20  # bytes read at a time

log = logging.getLogger(__name__)


class CheckpointIntegrityError(ValueError):
  """A step's files differ from what its save recorded (`step`, `file` relative to the step folder)."""

  def __init__(self, step: int, file: str, reason: str):
    super().__init__(f"checkpoint step {step}: {file}: {reason}")
    self.step, self.file, self.reason = step, file, reason


def _files(step_dir: epath.Path) -> list[str]:
  """Paths of every file under `step_dir`, relative to it, sorted (without `checksums.json`)."""
  root = os.fspath(step_dir).rstrip("/")
  if paths.is_remote(root):
    fs = epath_backend.fsspec_backend.fs(root)
    key = fs._strip_protocol(root).rstrip("/")  # fsspec's spelling of the listed names
    found = [name[len(key) + 1:] for name in fs.find(key)]
  else:
    found = [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for d, _, names in os.walk(root)
             for n in names]
  return sorted(rel for rel in found if rel and rel != CHECKSUMS_FILE)


def file_checksum(p: epath.Path) -> tuple[int, str]:
  """`(size in bytes, crc32c as 8 hex digits)` of the file `p`, read in chunks."""
  crc, size = google_crc32c.Checksum(), 0
  with p.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc.update(chunk)
      size += len(chunk)
  return size, crc.hexdigest().decode()


def write_checksums(step_dir: str | os.PathLike) -> dict[str, Any]:
  """Computes the checksums of every file of the committed step folder `step_dir` and writes them to its
  `checksums.json` (atomically); returns the record."""
  step_dir = paths.path(step_dir)
  paths.refresh(step_dir)
  files = {}
  for rel in _files(step_dir):
    size, crc = file_checksum(step_dir / rel)
    files[rel] = {"size": size, ALGORITHM: crc}
  record = {"algorithm": ALGORITHM, "files": files}
  paths.write_atomic(step_dir / CHECKSUMS_FILE, json.dumps(record, indent=0))
  return record


def read_checksums(step_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The step's recorded checksums, or None when it has none."""
  p = paths.path(step_dir) / CHECKSUMS_FILE
  if not p.exists():
    return None
  try:
    record = json.loads(p.read_text())
    if record.get("algorithm") != ALGORITHM or not isinstance(record.get("files"), dict):
      raise ValueError(f"expected {{'algorithm': '{ALGORITHM}', 'files': {{...}}}}")
  except ValueError as e:
    raise CheckpointIntegrityError(_step_of(step_dir), CHECKSUMS_FILE, f"unreadable: {e}") from e
  return record


def verify_step(step_dir: str | os.PathLike) -> dict[str, Any] | None:
  """Reads every file the step's `checksums.json` lists and compares size and crc32c; returns the record (None when
  the step has no checksums: unverified). Raises `CheckpointIntegrityError` (step, file) on the first mismatch."""
  step_dir = paths.path(step_dir)
  paths.refresh(step_dir)
  record = read_checksums(step_dir)
  if record is None:
    return None
  step = _step_of(step_dir)
  for rel, want in record["files"].items():
    p = step_dir / rel
    if not p.exists():
      raise CheckpointIntegrityError(step, rel, "missing")
    size, crc = file_checksum(p)
    if size != want["size"]:
      raise CheckpointIntegrityError(step, rel,
                                     f"{size} bytes, {want['size']} bytes when saved (truncated or overwritten)")
    if crc != want[ALGORITHM]:
      raise CheckpointIntegrityError(step, rel, f"crc32c {crc}, {want[ALGORITHM]} when saved (the content changed)")
  return record


def step_size(step_dir: str | os.PathLike) -> int:
  """Bytes of every file under `step_dir`."""
  step_dir = paths.path(step_dir)
  return sum((step_dir / rel).stat().length for rel in _files(step_dir)) + (
      (step_dir / CHECKSUMS_FILE).stat().length if (step_dir / CHECKSUMS_FILE).exists() else 0)


def _step_of(step_dir: str | os.PathLike) -> int | str:
  name = paths.path(step_dir).name
  return int(name) if name.isdigit() else name


def move_aside(step_dir: str | os.PathLike) -> epath.Path:
  """Renames the step folder to `<step>.corrupt` (or `.corrupt.N` when taken); returns the new path. Nothing is
  deleted."""
  step_dir = paths.path(step_dir)
  target = step_dir.with_name(step_dir.name + CORRUPT_SUFFIX)
  n = 0
  while target.exists():
    n += 1
    target = step_dir.with_name(f"{step_dir.name}{CORRUPT_SUFFIX}.{n}")
  step_dir.rename(target)
  paths.refresh(step_dir.parent)
  return target


def is_moved_aside(name: str) -> bool:
  """Whether a folder name under `checkpoints/` is a step moved aside (`6.corrupt`, `6.corrupt.1`)."""
  head, sep, _ = name.partition(CORRUPT_SUFFIX)
  return bool(sep) and head.isdigit()


# ----------------------------------------------------------------------------------------------- save faults

# (what a user reads, what to do, whether retrying can help), by the first pattern found in the error's text.
_FAULTS = (
    (("no space left", "enospc", "resource_exhausted", "quota exceeded", "disk quota"),
     "no space left on the device", "free space (or raise the quota) and run the same command again", False),
    (("permission denied", "eacces", "permission_denied", "403", "forbidden"),
     "permission denied", "make the workdir writable for this user and run the same command again", False),
    (("read-only file system", "erofs"),
     "the file system is read-only", "remount it writable (or use another workdir) and run the same command again",
     False),
    (("unavailable", "503", "502", "500 internal", "429", "too many requests", "deadline_exceeded", "timed out",
      "timeout", "connection refused", "connection reset", "cannot connect", "server disconnected",
      "clientconnectorerror", "temporarily"),
     "the storage is unavailable", "check the bucket or network and run the same command again", True),
)
_ERRNOS = {errno.ENOSPC: 0, errno.EDQUOT: 0, errno.EACCES: 1, errno.EPERM: 1, errno.EROFS: 2}


def describe_fault(error: BaseException) -> tuple[str, str, bool]:
  """`(what failed, what to do, transient)` of an exception raised by a save (its chain included)."""
  texts, e, seen = [], error, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _ERRNOS:
      what, todo, transient = _FAULTS[_ERRNOS[e.errno]][1:]
      return what, todo, transient
    texts.append(f"{type(e).__name__}: {e}".lower())
    e = e.__cause__ or e.__context__
  text = " ".join(texts)
  for patterns, what, todo, transient in _FAULTS:
    if any(p in text for p in patterns):
      return what, todo, transient
  return type(error).__name__, "fix its cause and run the same command again (CVVAE_DEBUG=1: the traceback)", False


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of the message of an error's root cause (`raise ... from`: e.g. TensorStore's `OUT_OF_RANGE:
  Error reading ...` under Orbax's `Encountered error while reading array index`), at most `limit` characters."""
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------- late callbacks of a failed save

def _is_closed_loop_callback(unraisable) -> bool:
  """`RuntimeError: Event loop is closed` raised in `loop.call_soon_threadsafe` from a TensorStore callback."""
  e, tb = unraisable.exc_value, unraisable.exc_traceback
  if not isinstance(e, RuntimeError) or str(e) != "Event loop is closed":
    return False
  names = []
  while tb is not None:
    names.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return "call_soon_threadsafe" in names


class _DropClosedLoopCallbacks:
  """`sys.unraisablehook` that drops the late callbacks of a failed Orbax save and passes everything else on.

  Why they happen (orbax-checkpoint 0.12.8): a save runs its coroutines on a fresh event loop
  (`asyncio_utils._run_sync_via_new_loop`) and writes the fragments of an array with `asyncio.gather(...)`
  (`serialization.async_serialize_from_host`). When one TensorStore write fails (a full disk, a permission, a
  bucket error), `gather` raises at once and the loop is closed while the other writes are still in flight; as each
  of them completes (failing too), TensorStore's completion callback calls `loop.call_soon_threadsafe` on the closed
  loop, and the RuntimeError, raised in a TensorStore thread, reaches `sys.unraisablehook`: one traceback per
  pending write (about a thousand lines for the demo config). The save's own error is reported once, by the save.
  """

  def __init__(self, previous):
    self.previous, self.dropped = previous, 0

  def __call__(self, unraisable) -> None:
    if _is_closed_loop_callback(unraisable):
      self.dropped += 1
      log.debug("dropped a TensorStore callback after its save failed and Orbax closed the event loop (%d)",
                self.dropped)
      return
    self.previous(unraisable)


class _DropOrphanedWriteErrors(logging.Filter):
  """On the `asyncio` logger: once a save has failed (`armed`), drops "... exception was never retrieved" records.

  The same Orbax path gathers the writes of many arrays at once; after the first failure the other gathers' errors
  are never awaited, and asyncio logs each with its traceback when the future is garbage-collected (often at exit).
  They repeat the failure the save already reported. Before any save failed, nothing is dropped."""

  armed = False

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.armed and "exception was never retrieved" in record.getMessage())


_ORPHANED = _DropOrphanedWriteErrors()


def drop_closed_loop_callbacks() -> None:
  """Installs `_DropClosedLoopCallbacks` (once per process) in front of the current `sys.unraisablehook`, and
  `_DropOrphanedWriteErrors` on the `asyncio` logger."""
  if not isinstance(sys.unraisablehook, _DropClosedLoopCallbacks):
    sys.unraisablehook = _DropClosedLoopCallbacks(sys.unraisablehook)
  if _ORPHANED not in logging.getLogger("asyncio").filters:
    logging.getLogger("asyncio").addFilter(_ORPHANED)


def save_failed() -> None:
  """Called when a save failed: from now on, the orphaned errors of its other writes are not logged again."""
  _ORPHANED.armed = True
