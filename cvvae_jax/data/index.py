"""The index of a folder of media files: listed and probed once, kept in a file, reused and updated incrementally.

A folder read directly (`sources.FolderSource`) is listed (paths, sizes, mtimes) at every start; only files that
are new or whose size or mtime changed are probed, and files that are gone are dropped. The index is a JSON-lines
file: a header line, then one line per file, sorted by path:

    {"path": "a/b.mp4", "size": 1234, "mtime_ns": ..., "num_frames": 120, "fps": 29.97, "height": 720, "width": 1280}
    {"path": "c.mp4", "size": 0, "mtime_ns": ..., "error": "empty file (0 bytes)"}

It is kept at `<folder>/.cvvae_index/<kind>.jsonl` (hidden folders are never listed as data), or, where the folder
cannot be written, at `<cache_dir>/<sha1 of the folder>/<kind>.jsonl` (cache_dir default
~/.cache/cvvae_jax/index). Probing reads an mp4/mov header's sample table where it states the frames exactly
(`mp4.py`, without FFmpeg), else container metadata (the stream's frame count, else duration x rate) confirmed by
seeking to the last keyframe and reading the last GOP's packet timestamps (no decoding; see
`folders.probe_video_file`); only streams whose timestamps are off a constant frame grid are decoded in full.
Images are probed from their header (size, EXIF orientation). Damage that the probe does not see (a corrupt
middle, an index whose size and mtime still match a changed file) is caught when a clip is decoded, where the
pipeline skips the file and counts it.

Work is split across hosts: with `process_count` > 1 each process probes every `process_count`-th file to
probe, writes its share next to the index, and process 0 merges the shares and writes the index, which the
other processes wait for (the folder or cache dir must be shared, e.g. a bucket or NFS). Within a process,
probing runs in `workers` forked processes (pure PyAV/Pillow work), with progress (files/s, ETA) in the log.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from etils.epath import backend as epath_backend

from cvvae_jax import paths
from cvvae_jax.data import folders, media
from cvvae_jax.data.sampling import Kind

VERSION = 2  # 2: height and width as displayed (rotated videos, `rotation.py`); an index of another version is rebuilt
INDEX_DIRNAME = ".cvvae_index"
DEFAULT_CACHE_DIR = "~/.cache/cvvae_jax/index"
_POOL_MIN_FILES = 64  # fewer files to probe than this: probed in this process (a pool costs more than it saves)
_WAIT_TIMEOUT_S = 6 * 3600
SPLIT_MIN_FILES = 256  # fewer files to probe than this: every host probes them all (no waiting on each other)


def _open(root: str, rel: str):
  if paths.is_remote(root):
    return (paths.path(root) / rel).open("rb")
  return open(os.path.join(root, rel), "rb")


def probe_file(root: str, rel: str, kind: Kind) -> dict[str, Any]:
  """The index fields of `root/rel` (metadata, or "error": the reason it cannot be used); never raises."""
  try:
    with _open(root, rel) as f:
      return folders.probe_video_file(f) if kind is Kind.VIDEO else folders.probe_image_file(f)
  except media.BadInput as e:
    return {"error": e.reason}
  except Exception as e:  # noqa: BLE001  (a bad file must never stop a run)
    return {"error": f"unreadable ({type(e).__name__}: {e})"}


def _probe_task(task: tuple[str, str, str, int, int]) -> dict[str, Any]:
  root, rel, kind, size, mtime_ns = task
  return {"path": rel, "size": size, "mtime_ns": mtime_ns, **probe_file(root, rel, Kind(kind))}


# ----------------------------------------------------------------------------------------------------
# Listing, storing, building.
# ----------------------------------------------------------------------------------------------------

def _remote_stats(root: str) -> list[tuple[str, int, int]]:
  """`list_stats` of a bucket folder from one recursive listing (fsspec `find`, ~1 request per 1,000 objects), not
  a request per file; the "mtime" is the object's generation where the store has one (GCS), else its update time."""
  fs = epath_backend.fsspec_backend.fs(root)
  prefix = fs._strip_protocol(root).rstrip("/")  # pylint: disable=protected-access
  if not fs.isdir(prefix):
    folders.list_files(root)  # raises the same FileNotFoundError as for a local folder
  out = []
  for key, info in fs.find(prefix, detail=True).items():
    rel = key[len(prefix):].strip("/")
    if not rel or info.get("type") == "directory" or any(part.startswith(".") for part in rel.split("/")[:-1]):
      continue
    version = info.get("generation")
    if version is None:
      updated = info.get("mtime") or info.get("updated") or info.get("LastModified") or 0
      if isinstance(updated, str):
        updated = datetime.datetime.fromisoformat(updated.replace("Z", "+00:00"))
      version = int(updated.timestamp() * 1e9) if hasattr(updated, "timestamp") else int(float(updated) * 1e9)
    out.append((rel, int(info.get("size") or 0), int(version)))
  return sorted(out)


def list_stats(root: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime in ns) of every file under `root`, sorted (hidden folders skipped)."""
  if paths.is_remote(root):
    return _remote_stats(root)
  out = []
  for rel in folders.list_files(root):
    st = os.stat(os.path.join(root, rel))
    out.append((rel, st.st_size, st.st_mtime_ns))
  return out


def index_path(root: str, kind: Kind, index_dir: str = "") -> str:
  """Where the index of `root` is kept: `index_dir` if given, else next to the data if writable, else the cache."""
  name = f"{kind.value}.jsonl"
  if index_dir:
    return os.path.join(paths.normalize(index_dir), name) if not paths.is_remote(index_dir) else \
        f"{index_dir.rstrip('/')}/{name}"
  if paths.is_remote(root):
    return f"{root.rstrip('/')}/{INDEX_DIRNAME}/{name}"
  folder = os.path.join(root, INDEX_DIRNAME)
  try:
    os.makedirs(folder, exist_ok=True)
    if os.access(folder, os.W_OK):
      return os.path.join(folder, name)
  except OSError:
    pass
  digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser(DEFAULT_CACHE_DIR), digest, name)


def _dumps(header: dict[str, Any], entries: list[dict[str, Any]]) -> str:
  lines = [json.dumps(header, sort_keys=True)] + [json.dumps(e, sort_keys=True) for e in entries]
  return "\n".join(lines) + "\n"


def read_index(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """(header, path -> entry) of an index file; ({}, {}) if it is missing or from another version."""
  p = paths.path(path)
  try:
    text = p.read_text()
  except (FileNotFoundError, OSError):
    return {}, {}
  lines = text.splitlines()
  try:
    header = json.loads(lines[0]) if lines else {}
    if header.get("version") != VERSION:
      return {}, {}
    return header, {e["path"]: e for e in map(json.loads, lines[1:])}
  except (ValueError, KeyError):
    logging.warning("data: ignoring the unreadable index %s (it is rebuilt)", path)
    return {}, {}


def _probe_all(tasks: list[tuple], workers: int, what: str) -> list[dict[str, Any]]:
  """Probes `tasks` (in forked processes when there are many), logging files/s and ETA every ~5 s."""
  out: list[dict[str, Any]] = []
  if not tasks:
    return out
  t0 = last_log = time.perf_counter()
  def progress(done: int) -> None:
    nonlocal last_log
    now = time.perf_counter()
    if now - last_log >= 5 or done == len(tasks):
      rate = done / max(now - t0, 1e-9)
      logging.info("data: indexing %s: %d/%d files probed, %.0f files/s, ETA %.0f s", what, done, len(tasks),
                   rate, (len(tasks) - done) / max(rate, 1e-9))
      last_log = now
  if workers <= 1 or len(tasks) < _POOL_MIN_FILES:
    for task in tasks:
      out.append(_probe_task(task))
      progress(len(out))
    return out
  # fork: the workers only run PyAV/Pillow on files; a spawned one would re-import JAX and TF (tens of seconds).
  with multiprocessing.get_context("fork").Pool(workers) as pool:
    for entry in pool.imap(_probe_task, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers)))):
      out.append(entry)
      progress(len(out))
  return out


def _wait_for(check: Callable[[], Any], what: str) -> Any:
  t0 = time.perf_counter()
  while (result := check()) is None:
    if time.perf_counter() - t0 > _WAIT_TIMEOUT_S:
      raise TimeoutError(f"data: waited {_WAIT_TIMEOUT_S} s for {what}")
    time.sleep(0.2)
  return result


@dataclasses.dataclass
class FolderIndex:
  """`entries`: one per file of the kind, sorted by path, with metadata or "error"; `others`: files with other
  extensions (not indexed); `counts`: {"listed", "reused", "probed"} ("probed": by this process); `path`: the file."""
  entries: list[dict[str, Any]]
  others: list[str]
  counts: dict[str, int]
  path: str


def build_index(root: str, kind: Kind, *, index_dir: str = "", workers: int = 0, process_index: int = 0,
                process_count: int = 1, split_min_files: int = SPLIT_MIN_FILES) -> FolderIndex:
  """Lists `root`, probes what the stored index lacks or has stale (by size and mtime), stores and returns it.

  Args:
    root: a folder (local or gs://...), normalized.
    kind: which extensions count; files with other extensions are left out (not indexed).
    index_dir: where to keep the index ("" : next to the data, else the cache; see the module docstring).
    workers: probing processes on this host (0: all cores).
    process_index, process_count: this host's share of the probing; process 0 merges and writes. The work is
      split only when there are at least `split_min_files` files to probe (fewer: each process probes them all
      and writes the same index, so that processes need not run at the same time).
  Returns:
    The FolderIndex.
  """
  root = paths.normalize(root)
  extensions = media.EXTENSIONS[kind.value]
  listed, others = [], []
  for stat in list_stats(root):
    (listed if os.path.splitext(stat[0])[1].lower() in extensions else others).append(stat)
  others = [rel for rel, _, _ in others]
  path = index_path(root, kind, index_dir)
  _, stored = read_index(path)
  reused, tasks = {}, []
  for rel, size, mtime_ns in listed:
    old = stored.get(rel)
    if old is not None and old["size"] == size and old["mtime_ns"] == mtime_ns:
      reused[rel] = old
    else:
      tasks.append((root, rel, kind.value, size, mtime_ns))
  counts = {"listed": len(listed), "reused": len(reused), "probed": 0}
  if not tasks:
    return FolderIndex([reused[rel] for rel, _, _ in listed], others, counts, path)
  digest = hashlib.sha1(json.dumps(listed).encode()).hexdigest()[:16]
  if len(tasks) < split_min_files:
    process_index, process_count = 0, 1
  mine = tasks[process_index::process_count]
  workers = workers or os.cpu_count() or 1
  logging.info("data: indexing %s: %d files listed, %d reused from %s, %d to probe (%d on this process)",
               root, len(listed), len(reused), path, len(tasks), len(mine))
  probed = _probe_all(mine, workers, root)
  counts["probed"] = len(probed)
  header = {"version": VERSION, "kind": kind.value, "root": root, "listing": digest}
  if process_count > 1:
    shard = f"{path}.{digest}.part{process_index}-of-{process_count}"
    paths.write_atomic(shard, _dumps(header, probed))
    def written(where: str):
      head, entries = read_index(where)
      return entries if head.get("listing") == digest else None
    if process_index != 0:
      merged = _wait_for(lambda: written(path), f"process 0 to write the index {path}")
      return FolderIndex([merged[rel] for rel, _, _ in listed], others, counts, path)
    for p in range(1, process_count):
      part_path = f"{path}.{digest}.part{p}-of-{process_count}"
      probed += list(_wait_for(lambda q=part_path: written(q), f"the share {part_path}").values())
  new = {e["path"]: e for e in probed}
  entries = [reused.get(rel) or new[rel] for rel, _, _ in listed]
  paths.write_atomic(path, _dumps(header, entries))
  for p in range(process_count if process_count > 1 else 0):
    paths.path(f"{path}.{digest}.part{p}-of-{process_count}").unlink(missing_ok=True)
  return FolderIndex(entries, others, counts, path)
