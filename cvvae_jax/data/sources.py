"""Random-access sources of records: a folder of files, or a prepared TFDS dataset.

A source is a sequence: `len(source)` and `source[i] -> record`, where a record is a dict
`{"key": relative path, "data": encoded file bytes, "num_frames", "height", "width"}` (videos;
images need only "key" and "data"). Both kinds list the same files in the same order (sorted
relative paths, bad files left out by the same probe), so a folder read directly and its TFDS copy
give the same examples.

TFDS datasets can be in array_record (read with `as_data_source`) or TFRecord files (indexed here by
record offsets, read with seek); either gives random access, which is what makes the order a pure
function of (seed, position) and the iterator resumable from a step.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Protocol

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cvvae_jax import paths
from cvvae_jax.data import builders, embedded, folders, index, media
from cvvae_jax.data.sampling import Kind
from cvvae_jax.data.stats import DataStats

EMBEDDED = "embedded"  # the `--data` value naming the built-in clips (`embedded:video`, `embedded:image`)


class Source(Protocol):
  """What the pipeline reads from."""
  name: str
  kind: Kind

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...
  def locate(self, key: str) -> str: ...       # a record's key -> what to show the user
  def describe(self, index: int) -> str: ...   # the same, before the record could be read


class FolderSource:
  """Files of one kind under a folder, from its index (`index.py`: probed once, reused and updated on later starts;
  bad files skipped and counted)."""

  def __init__(self, root: str, kind: Kind, *, stats: DataStats, workers: int = 4, index_dir: str = "",
               process_index: int = 0, process_count: int = 1):
    self.root = paths.normalize(root)  # local (made absolute) or gs://...
    self.kind = kind
    self.name = f"folder:{self.root}"
    built = index.build_index(self.root, kind, index_dir=index_dir, workers=workers, process_index=process_index,
                              process_count=process_count)
    extensions = media.EXTENSIONS[kind.value]
    for rel in built.others:
      ext = os.path.splitext(rel)[1].lower()
      stats.skip(self.locate(rel), f"unsupported extension {ext or '(none)'!r} for a {kind.value} folder "
                 f"(expected one of {', '.join(extensions)})")
    self._entries = []
    for entry in built.entries:
      if "error" in entry:
        stats.skip(self.locate(entry["path"]), entry["error"])
      else:
        meta = {k: v for k, v in entry.items() if k not in ("path", "size", "mtime_ns")}
        self._entries.append({"key": entry["path"], **meta})
    logging.info("data: %s: %d usable of %d %s files (index %s: %d reused, %d probed here)", self.name,
                 len(self._entries), built.counts["listed"], kind.value, built.path, built.counts["reused"],
                 built.counts["probed"])
    if not self._entries:
      raise ValueError(f"no usable {kind.value} files in folder {self.root!r} ({stats.num_skipped} "
                       f"file(s) skipped so far; expected extensions {extensions})")

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[index]
    return {**entry, "data": folders.read_file(self.root, entry["key"])}

  def locate(self, key: str) -> str:
    return f"{self.root.rstrip('/')}/{key}"

  def describe(self, index: int) -> str:
    return self.locate(self._entries[index]["key"])


# ----------------------------------------------------------------------------------------------------
# TFDS.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _RecordLocation:
  path: str
  offset: int
  length: int


def index_tfrecord_file(path: str, skip: int = 0, take: int = -1) -> list[_RecordLocation]:
  """Byte offsets of the records of a TFRecord file (reads the 12-byte headers only).

  TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC.
  """
  out = []
  with epath.Path(path).open("rb") as f:
    position = 0
    while take < 0 or len(out) < skip + take:
      f.seek(position)
      header = f.read(12)
      if len(header) < 12:
        break
      (length,) = struct.unpack("<Q", header[:8])
      out.append(_RecordLocation(path, position + 12, length))
      position += 12 + length + 4
  return out[skip:]


def prepared_builder(name: str, data_dir: str | None, kind: str = "video|image") -> tfds.core.DatasetBuilder:
  """The TFDS dataset `name` in `data_dir`, checked to be prepared (ours, `cvvae_video_folder` and
  `cvvae_image_folder`, are registered by `builders`). FileNotFoundError says what is missing and how to prepare."""
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise FileNotFoundError(f"TFDS dataset {name!r} not found (data_dir={data_dir!r}): {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it once with "
        f"`python -m cvvae_jax.data.prepare --kind={kind} --data=<your folder> --data_dir=<data_dir>` "
        "(or `tfds build`).")
  return builder


def encoded_feature(features) -> str:
  """The feature holding encoded files: "data" (our builders), else "image" (TFDS image datasets), else ""."""
  return "data" if "data" in features else "image" if "image" in features else ""


class TfdsSource:
  """A prepared TFDS dataset split with random access (array_record or TFRecord files).

  Datasets made by our builders (`cvvae_video_folder`, `cvvae_image_folder`) carry the record layout
  above. Any TFDS image dataset works too: set `data_key` to its image feature (e.g. "image"); its
  encoded bytes are read undecoded.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None, kind: Kind, data_key: str = "data",
               stats: DataStats):
    builder = prepared_builder(name, data_dir, kind.value)
    if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
      raise ValueError(f"TFDS dataset {name!r}: expected a split in {list(builder.info.splits)}, "
                       f"got {split!r}")
    features = builder.info.features
    if data_key not in features:
      raise ValueError(f"TFDS dataset {name!r}: expected a feature {data_key!r} holding encoded "
                       f"files, got features {list(features)}")
    if kind is Kind.VIDEO and "num_frames" not in features:
      raise ValueError(f"TFDS dataset {name!r} has no 'num_frames' feature: video datasets must be "
                       f"prepared with cvvae_video_folder")
    self.kind = kind
    self.name = f"tfds:{builder.info.full_name}"
    self._data_key = data_key
    self._split = split
    self._has_key = "key" in features
    self._decoders = {data_key: tfds.decode.SkipDecoding()}
    self._features = features
    file_format = builder.info.file_format
    if file_format is not None and file_format.value == "array_record":
      self._ds = builder.as_data_source(split, decoders=self._decoders)
      self._locations = None
    else:
      instructions = builder.info.splits[split].file_instructions
      self._locations = [loc for ins in instructions
                         for loc in index_tfrecord_file(ins.filename, ins.skip, ins.take)]
      self._ds = None
    if len(self) == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    for path, reason in dict(builder.info.metadata or {}).get("skipped", {}).items():
      stats.skip(path, f"skipped when the dataset was prepared: {reason}")

  def __len__(self) -> int:
    return len(self._ds) if self._locations is None else len(self._locations)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._locations is None:
      example = self._ds[index]
    else:
      loc = self._locations[index]
      with epath.Path(loc.path).open("rb") as f:
        f.seek(loc.offset)
        raw = f.read(loc.length)
      example = self._features.deserialize_example_np(raw, decoders=self._decoders)
    key = example["key"] if self._has_key else f"{self._split}[{index}]"
    out = {k: v for k, v in example.items() if k not in ("key", self._data_key)}
    out["key"] = key.decode() if isinstance(key, bytes) else str(key)
    out["data"] = bytes(example[self._data_key])
    return out

  def locate(self, key: str) -> str:
    return f"{self.name}:{key}"

  def describe(self, index: int) -> str:
    return f"{self.name}:{self._split}[{index}]"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A `--data` argument read as the source it names (the fields of `open_source` and of a data config's stream)."""

  kind: str  # "video" | "image"
  source: str  # "folder" | "tfds" | "embedded"
  path: str = ""
  tfds_name: str = ""
  split: str = "train"
  data_dir: str = ""
  data_key: str = "data"

  @property
  def name(self) -> str:
    if self.source == "folder":
      return os.path.basename(os.path.normpath(self.path))
    if self.source == "tfds":
      return f"{self.tfds_name}:{self.split}"
    return f"embedded {self.kind}s ({self.split})"


def describe_data(data: str, *, kind: str = "auto", data_dir: str = "", split: str = "",
                  data_key: str = "") -> DataSpec:
  """Reads a command's `--data` as the embedded set (`embedded[:video|image]`), a folder (local or remote) or a
  prepared TFDS name, before any file is read; `kind` "auto" takes it from the folder's files (videos win) or the
  TFDS features. Raises ValueError saying what was expected."""
  if kind not in ("auto", "video", "image"):
    raise ValueError(f"--data_kind: expected auto, video or image, got {kind!r}")
  if data == EMBEDDED or data.startswith(EMBEDDED + ":"):
    named = data.split(":", 1)[1] if ":" in data else (kind if kind != "auto" else "video")
    if named not in ("video", "image"):
      raise ValueError(f"--data {data}: expected 'embedded', 'embedded:video' or 'embedded:image'")
    return DataSpec(kind=named, source="embedded", split=embedded.resolve_split(named, split))
  if paths.is_remote(data) or os.path.exists(data):
    if not paths.path(data).is_dir():
      raise ValueError(f"--data {data}: expected a folder of videos or images (or a TFDS name), got "
                       f"{'a file' if paths.path(data).exists() else 'a path that does not exist'}")
    return DataSpec(kind=folders.folder_kind(data) if kind == "auto" else kind, source="folder",
                    path=paths.normalize(data))
  try:
    builder = prepared_builder(data, data_dir or None)
  except FileNotFoundError as e:
    raise ValueError(f"--data {data}: not a folder, and not a TFDS dataset ready to read: {e}") from None
  features = builder.info.features
  key = data_key or encoded_feature(features)
  if key not in features:
    raise ValueError(f"--data {data}: expected --data_key naming the feature with encoded files, one of "
                     f"{list(features)}")
  return DataSpec(kind=kind if kind != "auto" else ("video" if "num_frames" in features else "image"),
                  source="tfds", tfds_name=data, split=split or builders.preferred_split(builder.info.splits),
                  data_dir=data_dir, data_key=key)


def open_source(*, kind: str | Kind, source: str, path: str = "", tfds_name: str = "",
                split: str = "train", data_dir: str = "", data_key: str = "data", embedded_dir: str = "",
                stats: DataStats, workers: int = 4, index_dir: str = "", process_index: int = 0,
                process_count: int = 1, where: str = "stream") -> Source:
  """Opens the source a stream or eval config names; errors name the config fields to set.

  Args:
    kind: "video" or "image".
    source: "folder" (read `path` directly), "tfds" (`tfds_name`/`split` in `data_dir`), or
      "embedded" (the built-in real clips and photos, prepared under `embedded_dir` on first use).
    workers, index_dir, process_index, process_count: how a folder's index is built and where it is kept
      (`index.build_index`).
  """
  kind = Kind(kind) if isinstance(kind, str) else kind
  if source == "folder":
    if not path:
      raise ValueError(f"{where}.path is unset: expected a folder of {kind.value} files "
                       f"({', '.join(media.EXTENSIONS[kind.value])}), e.g. "
                       f"--config.data.{where.split('.', 1)[-1]}.path=/data/my_{kind.value}s")
    return FolderSource(path, kind, stats=stats, workers=workers, index_dir=index_dir, process_index=process_index,
                        process_count=process_count)
  if source == "tfds":
    if not tfds_name:
      raise ValueError(f"{where}.tfds_name is unset: expected the name of a prepared TFDS dataset, "
                       f"e.g. {builders.BUILDERS[kind.value].name} (see cvvae_jax.data.builders)")
    return TfdsSource(tfds_name, split=split, data_dir=data_dir or None, kind=kind, data_key=data_key,
                      stats=stats)
  if source == "embedded":
    if not embedded_dir:
      raise ValueError(f"expected config.embedded_dir to be set for {where}.source='embedded'")
    tfds_dir = embedded.prepare_embedded_dataset(embedded_dir)
    return TfdsSource(embedded.DATASET_NAMES[kind.value], split=embedded.resolve_split(kind.value, split),
                      data_dir=tfds_dir, kind=kind, stats=stats)
  raise ValueError(f"{where}.source: expected 'folder', 'tfds' or 'embedded', got {source!r}")

