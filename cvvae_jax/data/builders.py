"""TFDS builders for a folder of videos and a folder of images, and a CLI to prepare them.

Each example stores the file's encoded bytes untouched, with the metadata the sampler needs, so one
prepared copy serves any clip length, stride, resolution or crop:

  cvvae_video_folder: {"key": relative path, "data": bytes, "num_frames", "height", "width", "fps"}
  cvvae_image_folder: {"key": relative path, "data": bytes, "height", "width"}

Examples are written in sorted path order (`disable_shuffling`), files that fail the probe are left
out and listed with their reason in the dataset's metadata (`metadata.json`, key "skipped"). The
folder given as manual dir becomes the "train" split; if it holds only sub-folders named train,
validation or test, each becomes that split.

Prepare once (array_record gives random access; TFRecord also works):

  python -m cvvae_jax.data.prepare --kind=video --data=/data/webvid --data_dir=/data/tfds/webvid
  # or with the TFDS CLI (tensorflow-datasets 4.9.10's CLI also needs apache-beam installed):
  tfds build cvvae_video_folder --imports=cvvae_jax.data.builders --manual_dir=/data/webvid \
      --data_dir=/data/tfds/webvid --file_format=array_record

then set the stream's `source="tfds"`, `tfds_name="cvvae_video_folder"`, `data_dir=...`. Use one
data_dir per folder (the dataset name is the same for every folder).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cvvae_jax import paths
from cvvae_jax.data import folders
from cvvae_jax.data.sampling import Kind

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_PREFERENCE = ("validation", "test", "train")  # the split evaluation reads when none is named
_PROBE_WORKERS = max(1, min(8, os.cpu_count() or 1))


def preferred_split(splits) -> str:
  """Of a dataset's split names: validation, else test, else train, else the first."""
  splits = list(splits)
  return next((s for s in SPLIT_PREFERENCE if s in splits), splits[0])


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic; subclasses set `name` and `KIND`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded files with probe metadata, sorted by path."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder of files as manual_dir (tfds build --manual_dir=...)."
  KIND: Kind
  # TFDS derives this from the package through `importlib_resources`, which tensorflow-datasets
  # 4.9.10 imports lazily but does not install; giving it directly avoids that import.
  code_path = epath.Path(__file__)

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"A folder of {self.KIND.value} files, stored encoded (see cvvae_jax.data.builders).",
        features=tfds.features.FeaturesDict({
            "key": tfds.features.Text(),
            "data": tfds.features.Tensor(shape=(), dtype=np.object_),
            **self._features(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)  # local or gs://...
    if not paths.path(root).is_dir():
      raise FileNotFoundError(f"expected manual_dir to be a folder of {self.KIND.value} files, got {root!r}")
    entries = [e.name for e in paths.path(root).iterdir() if not e.name.startswith(".")]
    if entries and all(e in SPLIT_NAMES and (paths.path(root) / e).is_dir() for e in entries):
      folders = {e: os.fspath(paths.path(root) / e) for e in sorted(entries)}
    else:
      folders = {"train": root}
    self._skipped: dict[str, str] = {}
    self._lock = threading.Lock()
    return {split: self._generate_examples(folder) for split, folder in folders.items()}

  def _on_skip(self, path: str, reason: str) -> None:
    logging.warning("%s: skipping %s: %s", self.name, path, reason)
    with self._lock:
      self._skipped[path] = reason
      self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))

  def _generate_examples(self, folder: str):
    count = 0
    for record in folders.scan_folder(folder, self.KIND, workers=_PROBE_WORKERS, on_skip=self._on_skip):
      count += 1
      yield record["key"], {k: record[k] for k in self.info.features}
    if count == 0:
      raise ValueError(f"no usable {self.KIND.value} files in {folder!r} "
                       f"({len(self._skipped)} skipped)")


class VideoFolder(_FolderBuilder):
  """A folder of videos (mp4, webm, mov, avi, mkv, ...), decoded later with PyAV."""
  name = "cvvae_video_folder"
  KIND = Kind.VIDEO

  def _features(self) -> dict:
    return {"num_frames": tfds.features.Scalar(np.int32), "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32), "fps": tfds.features.Scalar(np.float32)}


class ImageFolder(_FolderBuilder):
  """A folder of images (jpg, png, webp, bmp, tif), any mode converted to RGB as `images.py` says."""
  name = "cvvae_image_folder"
  KIND = Kind.IMAGE

  def _features(self) -> dict:
    return {"height": tfds.features.Scalar(np.int32), "width": tfds.features.Scalar(np.int32)}


BUILDERS = {"video": VideoFolder, "image": ImageFolder}


def prepare_folder(kind: str, folder: str, data_dir: str, *,
                   file_format: str = "array_record") -> tfds.core.DatasetBuilder:
  """Builds (once; later calls reuse it) the TFDS copy of `folder` under `data_dir`.

  Args:
    kind: "video" or "image".
    folder: the files (searched recursively).
    data_dir: TFDS data dir; the dataset lands in `data_dir/cvvae_<kind>_folder/1.0.0`.
    file_format: "array_record" (random access, the default) or "tfrecord".
  Returns:
    The prepared builder.
  """
  if kind not in BUILDERS:
    raise ValueError(f"expected kind 'video' or 'image', got {kind!r}")
  folder = paths.normalize(folder)
  folders.list_files(folder)  # a clear error for a missing folder
  builder = BUILDERS[kind](data_dir=os.path.expanduser(data_dir), file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=folder))
  return builder
