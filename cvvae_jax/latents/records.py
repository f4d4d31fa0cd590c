"""The on-disk format of an encoded dataset: `latents.json`, ArrayRecord shards of one record per clip, and a
manifest per shard.

    OUT/latents.json                                   what made the latents (model, data, shapes, versions)
    OUT/latents-00000-of-00004.array_record            one record per clip, in clip order
    OUT/latents-00000-of-00004.json                    the shard's manifest: clips stored, clips skipped

Why ArrayRecord: a diffusion run reads random clips for weeks, so the file must give record `i` without scanning
(ArrayRecord keeps a footer index of its chunks; with `group_size:1` each record is its own chunk, one seek per
read); TFRecord has no index, so it would need a side index of byte offsets built and kept in step with each file
(what `data/sources.py` builds for TFDS TFRecord datasets at every start). ArrayRecord is also what TFDS and Grain
read, and its records are opaque bytes, so the loader needs neither TensorFlow nor protobuf parsing. Records are
written uncompressed: latents are float noise that compresses by a few percent, and decompression would cost the
loader more than the disk saves.

A clip is two records, `2 i` and `2 i + 1` for the shard's i-th clip: `MAGIC + uint32 header length + header JSON +
mean bytes`, then `MAGIC_LOGVAR + logvar bytes`, both arrays the latent shape `[1+k, h, w, C]` (channels-last) in
the dtype `latents.json` names (float32: the posterior exactly as the encoder returned it). Two records because an
ArrayRecord read costs about 1 us per KB (riegeli checks each chunk's hash and copies it; measured
`bench/latents_cost.py`): a loader yielding the posterior mean reads half the bytes. The header holds the clip's
metadata: `clip` (its number in the clip list), `path` (the source video), `frames` (the frame numbers read), `fps`
(the source's rate divided by the stride). Each array sits at its record's end, so the loader takes it as a view
without parsing the header.

A shard is complete when its manifest exists: both files are written under temporary names and renamed (the
array_record file first), so a killed job leaves either nothing, or a shard whose manifest is missing (it is
encoded again, to the same bytes).
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any
from collections.abc import Mapping

import numpy as np

FORMAT = "cvvae-latents/2"
INFO_NAME = "latents.json"
MAGIC, MAGIC_LOGVAR = b"CVL2", b"CVLV"
MEAN, LOGVAR = 0, 1  # record 2 i + part of a shard's i-th clip
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: a read decodes just the record asked for
READER_OPTIONS = "readahead_buffer_size:0"  # random reads: no read-ahead
TMP_MARK = ".tmp-"
# The latents.json entries a rerun must repeat exactly (the rest, e.g. versions, may change between runs).
SETTINGS = ("format", "model", "data", "encode", "clips", "latent")


def shard_stem(index: int, count: int) -> str:
  return f"latents-{index:05d}-of-{count:05d}"


def shard_path(out: str, index: int, count: int) -> str:
  return os.path.join(out, shard_stem(index, count) + ".array_record")


def manifest_path(out: str, index: int, count: int) -> str:
  return os.path.join(out, shard_stem(index, count) + ".json")


def pack(meta: Mapping[str, Any], mean: np.ndarray, logvar: np.ndarray) -> tuple[bytes, bytes]:
  """One clip's two records: `meta` (JSON-able) with the posterior's mean, and its log-variance, `[1+k, h, w, C]`."""
  if mean.shape != logvar.shape or mean.dtype != logvar.dtype:
    raise ValueError(f"expected mean and logvar of one shape and dtype, got {mean.shape} {mean.dtype} and "
                     f"{logvar.shape} {logvar.dtype}")
  header = json.dumps(dict(meta), sort_keys=True).encode()
  return (b"".join((MAGIC, struct.pack("<I", len(header)), header, np.ascontiguousarray(mean).tobytes())),
          MAGIC_LOGVAR + np.ascontiguousarray(logvar).tobytes())


def array(record: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """The mean or log-variance in a record, as a read-only view (no copy, no header parsing)."""
  count = math.prod(shape)  # (not np.prod: a tenth of the loader's time per record)
  start = len(record) - count * np.dtype(dtype).itemsize
  if start < len(MAGIC_LOGVAR) or record[:len(MAGIC)] not in (MAGIC, MAGIC_LOGVAR):
    raise ValueError(f"not a latent record of shape {shape} {np.dtype(dtype)} ({len(record)} bytes; expected it to "
                     f"start with {MAGIC!r} or {MAGIC_LOGVAR!r})")
  return np.frombuffer(record, dtype, count, offset=start).reshape(shape)


def metadata(record: bytes) -> dict[str, Any]:
  """The clip's metadata in its first record."""
  if record[:len(MAGIC)] != MAGIC:
    raise ValueError(f"not the first record of a latent clip (expected it to start with {MAGIC!r})")
  (length,) = struct.unpack_from("<I", record, len(MAGIC))
  return json.loads(record[len(MAGIC) + 4:len(MAGIC) + 4 + length])


def write_json_atomic(path: str, content: Mapping[str, Any]) -> None:
  """Writes JSON under a temporary name, then renames it into place (readers never see half a file)."""
  tmp = f"{path}{TMP_MARK}{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def read_info(out: str) -> dict[str, Any]:
  """`latents.json` of an encoded dataset (a clear error when the folder holds none)."""
  path = os.path.join(os.fspath(out), INFO_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{out}: expected a folder written by cvvae-encode-latents (with {INFO_NAME}), found "
                            f"{sorted(os.listdir(out))[:10] if os.path.isdir(out) else 'no such folder'}")
  info = read_json(path)
  if info.get("format") != FORMAT:
    raise ValueError(f"{path}: expected format {FORMAT!r}, got {info.get('format')!r}" + (
        " (one record per clip, before the mean and log-variance were split): encode the dataset again into a new "
        "--out" if info.get("format") == "cvvae-latents/1" else ""))
  return info


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  """The `SETTINGS` entries (nested, dotted names) where two latents.json contents differ."""
  keys = SETTINGS if not prefix else sorted(set(old) | set(new))
  out = []
  for key in keys:
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += settings_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
  return out


def latent_layout(info: Mapping[str, Any]) -> tuple[tuple[int, ...], np.dtype]:
  """(per-clip latent shape `[1+k, h, w, C]`, stored dtype) from latents.json."""
  return tuple(info["latent"]["shape"]), np.dtype(info["latent"]["dtype"])
