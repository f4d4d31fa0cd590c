r"""What encoding a dataset to latents costs beyond the encoder, and how fast the latent loader reads.

    python bench/latents_cost.py [--parts encode,loader] [--frames 17] [--resolution 64] [--clips_per_video 2]
        [--repeats 2] [--batches 3000] [--out bench/results]

encode: a demo-size CV-VAE (`configs/cvvae.py:sd21,demo`, random weights, as bench/eval_cost.py) on the embedded
  training clips (5 videos of 60 frames x `--clips_per_video`, 17x64x64 at stride 3; before the embedded set's v2,
  8 videos), two ways in one process, alternated `--repeats` times so that other jobs' load hits both alike:
    encode_latents  `cvvae_jax.latents.encode.encode_dataset` (decode threads, device step, records, shards,
                    manifests), batch 1 on 1 device; its steady clips/s after the first batch (the compile);
    plain loop      the same clips decoded beforehand (not timed), then `jax.jit(inference.encode)` called on each
                    clip in a Python loop with `block_until_ready`; clips/s after the first call (the compile).
  Target: encode_latents >= 0.9x the plain loop.
loader: a dataset of 512 synthetic clips of latent shape 5x32x32x4 (float32 mean and logvar, the records
  `cvvae-encode-latents` writes), read by `cvvae_jax.latents.dataset` in batches of 8 in a subprocess pinned to one
  core: batches/s for the posterior mean and for posterior samples (host-side noise), reading every batch from the
  ArrayRecord files and from the in-memory copy (`cache=True`); also the means with the log-variances
  (`with_logvar=True`, for noise drawn on the devices). Target: >= 1,000 batches/s. Besides wall-clock batches/s,
  batches per CPU second of the process (user + system, so page faults count): what one core gives when other jobs
  share it, as they do on the development machine.

Writes `<out>/latents_cost.json`. Results and reading: bench/README.md section 5.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

LOADER_SHAPE = (5, 32, 32, 4)


def write_demo_model(root: str) -> str:
  from configs import cvvae as cvvae_config
  import cvvae_jax
  from cvvae_jax.train import build
  from tests.helpers import random_params

  vae = build.build_vae(cvvae_config.get_config("sd21,demo").model)
  path = os.path.join(root, "cvvae_demo")
  cvvae_jax.save_pretrained(vae, random_params(vae, seed=0), path)
  return path


def run_encode(args, root: str) -> dict:
  import jax
  import numpy as np

  from cvvae_jax import inference, load_pretrained
  from cvvae_jax.data import sources
  from cvvae_jax.data.stats import DataStats
  from cvvae_jax.latents import clips, encode

  model_path = write_demo_model(root)
  settings = clips.ClipSettings(args.frames, 3, (args.resolution, args.resolution), args.clips_per_video)
  source = clips.open_data(sources.describe_data("embedded", split="train"), DataStats())
  videos = [clips.load_clip(source[c // settings.clips_per_video], settings, c % settings.clips_per_video)[0]
            for c in range(len(source) * settings.clips_per_video)]
  model, params = load_pretrained(model_path)
  params = inference.params_for(params, "encode")
  runs = {"encode_latents": [], "plain_loop": []}
  for repeat in range(args.repeats):
    cfg = encode.EncodeConfig(model=model_path, data="embedded", split="train",
                              out=os.path.join(root, f"latents_{repeat}"),
                              frames=args.frames, stride=3, resolution=(args.resolution, args.resolution),
                              clips_per_video=args.clips_per_video, batch_size=1, devices=1, log_every_s=1e9)
    run = encode.encode_dataset(cfg)["run"]
    runs["encode_latents"].append({k: round(v, 3) for k, v in run.items()})
    step = jax.jit(lambda p, x: inference.encode(model, p, x))
    x = [np.asarray(v[None], np.float32) / 127.5 - 1.0 for v in videos]
    t0 = time.perf_counter()
    step(params, x[0]).block_until_ready()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for clip in x[1:]:
      step(params, clip).block_until_ready()
    seconds = time.perf_counter() - t0
    runs["plain_loop"].append({"clips": len(x), "first_call_s": round(first, 3), "seconds": round(seconds, 3),
                               "steady_clips_per_s": round((len(x) - 1) / seconds, 3)})
  ours = sum(r["steady_clips_per_s"] for r in runs["encode_latents"]) / args.repeats
  plain = sum(r["steady_clips_per_s"] for r in runs["plain_loop"]) / args.repeats
  return {"model": "CV-VAE sd21 demo (configs/cvvae.py:sd21,demo), random weights", "clips": len(videos),
          "clip": f"{args.frames}x{args.resolution}x{args.resolution}, stride 3", "runs": runs,
          "encode_latents_clips_per_s": round(ours, 3), "plain_loop_clips_per_s": round(plain, 3),
          "ratio": round(ours / plain, 3), "target": ">= 0.9"}


def write_synthetic_latents(out: str, num_clips: int = 512, per_shard: int = 128) -> None:
  """A dataset in the layout cvvae-encode-latents writes (records, manifests, latents.json), random posteriors."""
  import numpy as np

  from cvvae_jax.latents import encode, records

  os.makedirs(out)
  rng = np.random.default_rng(0)
  shards = -(-num_clips // per_shard)
  for s in range(shards):
    writer = encode.ShardWriter(out, s, shards, range(s * per_shard, min((s + 1) * per_shard, num_clips)))
    for c in writer.expected:
      mean = rng.standard_normal(LOADER_SHAPE, np.float32)
      logvar = rng.uniform(-6, 0, LOADER_SHAPE).astype(np.float32)
      writer.write({"clip": c, "path": f"synthetic/{c}.mp4", "frames": list(range(17)), "fps": 24.0}, mean, logvar)
    writer.commit()
  records.write_json_atomic(os.path.join(out, records.INFO_NAME), {
      "format": records.FORMAT, "model": {"scaling_factor": 0.18215, "shift_factor": 0.0},
      "clips": {"num_clips": num_clips, "clips_per_shard": per_shard, "num_shards": shards},
      "latent": {"shape": list(LOADER_SHAPE), "dtype": "float32"}})


def loader_worker(root: str, batches: int) -> dict:
  """In a subprocess pinned to one core: batches/s of the loader, mean and sampled."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  from cvvae_jax import latents

  out = {}
  for cache in (False, True):
    for mode, rng, logvar, n in (("mean", None, False, batches), ("mean + logvar", None, True, batches // 2),
                                 ("sample", 0, False, max(batches // 10, 100))):
      t0 = time.perf_counter()
      ds = latents.dataset(root, 8, seed=0, rng=rng, cache=cache, with_logvar=logvar)
      opened = time.perf_counter() - t0
      next(ds)
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(n):
        next(ds)
      seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
      out[f"{mode}{', cache' if cache else ''}"] = {"batches": n, "seconds": round(seconds, 3),
                                                     "batches_per_s": round(n / seconds, 1),
                                                     "cpu_s": round(cpu, 3), "batches_per_cpu_s": round(n / cpu, 1),
                                                     "open_s": round(opened, 3)}
  return out


def run_loader(args, root: str) -> dict:
  data = os.path.join(root, "synthetic")
  write_synthetic_latents(data)
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--loader_worker", data,
                         "--batches", str(args.batches)], capture_output=True, text=True, check=True,
                        env={**os.environ, "PYTHONPATH": REPO})
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return {"dataset": f"512 clips of {'x'.join(map(str, LOADER_SHAPE))} float32 mean + logvar, 4 shards",
          "batch": 8, "cores": 1, **result, "target": ">= 1000 batches/s"}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="encode,loader")
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--clips_per_video", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--batches", type=int, default=3000)
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  p.add_argument("--loader_worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.loader_worker:
    print(json.dumps(loader_worker(args.loader_worker, args.batches)))
    return
  report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other "
                       "jobs)", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  parts = set(args.parts.split(","))
  with tempfile.TemporaryDirectory() as root:
    if "encode" in parts:
      report["encode"] = run_encode(args, os.path.join(root, "encode"))
    if "loader" in parts:
      report["loader"] = run_loader(args, root)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "latents_cost.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
