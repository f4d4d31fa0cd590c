r"""What each evaluation metric costs, and evaluation on 8 devices against 1.

    python bench/eval_cost.py [--parts cost,parity] [--model PATH] [--baseline PATH|none] [--frames 17]
        [--resolution 128] [--clips 2] [--repeats 2] [--variants all,no_fvd] [--out bench/results]

cost: `cvvae_jax.eval.run.evaluate` on the embedded real clips (`embedded:video`), the same settings with one metric
  off at a time (`--variants`: `all`, `no_fvd`, `no_lpips`, `no_compat` = `--image_vae none`), the variants
  alternated `--repeats` times in one process so that other jobs' load hits them alike. Each run's wall time is
  the whole evaluation (model loading, data, compile, every step, reports); `first_step_s` is the compile plus the
  first batch. Default models: full-size SD2.1 CV-VAE and SD image VAE (the baseline) with random weights (the cost
  does not depend on the values). Target: rFVD adds <= 25 % to the wall time at 17x128x128.
parity: one process with 8 fake CPU devices (`--xla_force_host_platform_device_count=8`) evaluates the 8 embedded
  clips with a batch of 8 sharded over 8 devices and with a batch of 1 on one device (demo-size random CV-VAE and
  image VAE, 17x64x64); per-clip metrics, I3D features and latent statistics must be bitwise identical.

Writes `<out>/eval_cost.json` and `<out>/eval_cost.md`. Results and reading: bench/README.md section 4.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

VARIANTS = {"all": {}, "no_fvd": {"fvd": False}, "no_lpips": {"lpips": False}, "no_compat": {"image_vae": "none"}}


def write_models(root: str, size: str) -> tuple[str, str]:
  """A CV-VAE and an image VAE folder (`save_pretrained`) with random weights: `full` or `demo` size."""
  from configs import cvvae as cvvae_config, image_vae as image_vae_config
  import cvvae_jax
  from cvvae_jax.train import build
  from tests.helpers import random_params

  if size == "full":
    vae, image_vae = cvvae_jax.CVVAE(variant="sd21"), cvvae_jax.ImageVAE()
  else:
    vae = build.build_vae(cvvae_config.get_config("sd21,demo").model)
    image_vae = build.build_vae(image_vae_config.get_config("sd21,demo").model)
  paths = os.path.join(root, f"cvvae_{size}"), os.path.join(root, f"image_vae_{size}")
  for model, path, seed in ((vae, paths[0], 0), (image_vae, paths[1], 1)):
    cvvae_jax.save_pretrained(model, random_params(model, seed=seed), path)
  return paths


def settings(args, model: str, baseline: str, out: str) -> dict:
  s = dict(model=model, data="embedded:video", out=out, frames=args.frames, stride=1,
           resolution=(args.resolution, args.resolution), max_clips=args.clips, batch_size=1, num_samples=0,
           progress=False)
  if baseline != "none":
    s["baseline"] = baseline
  return s


def run_cost(args, root: str) -> dict:
  from cvvae_jax.eval import config, run

  if args.model:
    model, baseline = args.model, args.baseline or "none"
  else:
    model, baseline = write_models(root, "full")
    baseline = baseline if args.baseline != "none" else "none"
  variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"--variants: expected some of {sorted(VARIANTS)}, got {sorted(unknown)}")
  runs = {v: [] for v in variants}
  for r in range(args.repeats):
    for v in variants:
      out = os.path.join(root, f"{v}_{r}")
      t0 = time.perf_counter()
      report = run.evaluate(config.EvalConfig(**{**settings(args, model, baseline, out), **VARIANTS[v]}))
      wall = time.perf_counter() - t0
      runs[v].append(dict(wall_s=wall, first_step_s=report["timing"]["first_step_s"],
                          clips=report["data"]["num_clips"], fvd=report.get("fvd", {}).get("status", "")))
      print(json.dumps({"variant": v, "repeat": r, **runs[v][-1]}), flush=True)
  summary = {}
  for v, rs in runs.items():
    summary[v] = dict(wall_s_median=statistics.median(x["wall_s"] for x in rs),
                      wall_s_min=min(x["wall_s"] for x in rs),
                      first_step_s_median=statistics.median(x["first_step_s"] for x in rs),
                      rest_s_median=statistics.median(x["wall_s"] - x["first_step_s"] for x in rs))
  if "all" in summary:
    for v in summary:
      if v != "all":
        summary[v]["all_over_this"] = summary["all"]["wall_s_median"] / summary[v]["wall_s_median"]
  return dict(model=model if args.model else "full-size SD2.1 CV-VAE, random weights",
              baseline=baseline if args.model or baseline == "none" else "full-size SD image VAE, random weights",
              frames=args.frames, resolution=args.resolution, clips=args.clips, runs=runs, summary=summary)


def parity_worker(root: str) -> dict:
  """In a process with 8 fake devices: batch 8 over 8 devices against batch 1 on one device, bit for bit."""
  import jax
  import numpy as np

  from cvvae_jax.eval import config, report as report_lib, run

  assert jax.local_device_count() == 8, jax.devices()
  model, baseline = write_models(root, "demo")
  args = argparse.Namespace(frames=17, resolution=64, clips=8)
  reports, times = {}, {}
  for name, batch in (("one_device", 1), ("eight_devices", 8)):
    t0 = time.perf_counter()
    r = run.evaluate(config.EvalConfig(**{**settings(args, model, baseline, os.path.join(root, name)),
                                          "batch_size": batch}))
    times[name] = time.perf_counter() - t0
    reports[name] = json.loads(json.dumps(report_lib.json_safe(r)))
  one, eight = reports["one_device"], reports["eight_devices"]
  same = {key: one[key] == eight[key] for key in ("per_clip", "results", "latent_statistics", "fvd")}
  feats = [np.load(os.path.join(root, n, "features.npz")) for n in ("one_device", "eight_devices")]
  same["features.npz"] = all(np.array_equal(feats[0][k], feats[1][k]) for k in feats[0].files)
  return dict(clips=one["data"]["num_clips"], devices={n: reports[n]["devices"] for n in reports},
              wall_s=times, bitwise_identical=same, all_identical=all(same.values()))


def run_parity(root: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--parity_worker", root], capture_output=True,
                        text=True, env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(error=(proc.stderr or proc.stdout)[-3000:])
  return json.loads(lines[-1])


def markdown(report: dict) -> str:
  lines = [f"# Evaluation cost ({report['machine']})", ""]
  cost = report.get("cost")
  if cost:
    lines += [f"{cost['model']} (baseline: {cost['baseline']}), {cost['clips']} embedded clips of "
              f"{cost['frames']}x{cost['resolution']}x{cost['resolution']}, batch 1, "
              f"{len(next(iter(cost['runs'].values())))} alternated runs each.", "",
              "| variant | wall s (median / min) | compile + first batch s | rest s | all / this |",
              "|---|---|---|---|---|"]
    for v, s in cost["summary"].items():
      ratio = f"{s['all_over_this']:.3f}" if "all_over_this" in s else "-"
      lines.append(f"| {v} | {s['wall_s_median']:.1f} / {s['wall_s_min']:.1f} | {s['first_step_s_median']:.1f} | "
                   f"{s['rest_s_median']:.1f} | {ratio} |")
    if "no_fvd" in cost["summary"] and "all_over_this" in cost["summary"]["no_fvd"]:
      added = cost["summary"]["no_fvd"]["all_over_this"] - 1
      lines += ["", f"rFVD adds {100 * added:.1f} % to the wall time (target <= 25 %): "
                f"{'met' if added <= 0.25 else 'NOT met'}."]
  parity = report.get("parity")
  if parity:
    lines += ["", "## 8 devices vs 1", ""]
    if "error" in parity:
      lines.append(f"error: {parity['error'][-500:]}")
    else:
      lines += [f"{parity['clips']} clips, {parity['devices']}; wall s {parity['wall_s']}", "",
                f"bitwise identical: {parity['bitwise_identical']} -> "
                f"{'all identical' if parity['all_identical'] else 'DIFFERENT'}"]
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="cost,parity")
  p.add_argument("--model", default="", help="model to time (default: full-size SD2.1 CV-VAE, random weights)")
  p.add_argument("--baseline", default="", help="baseline with --model, or 'none' (default: full-size image VAE)")
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--resolution", type=int, default=128)
  p.add_argument("--clips", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--variants", default="all,no_fvd")
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  p.add_argument("--parity_worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.parity_worker:
    print(json.dumps(parity_worker(args.parity_worker)))
    return
  import numpy as np
  a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
  t0 = time.perf_counter()
  a @ a
  gflops = 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
  report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy 2048^3 matmul "
                       f"{gflops:.0f} GFLOP/s at start", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  parts = set(args.parts.split(","))
  with tempfile.TemporaryDirectory() as root:
    if "cost" in parts:
      report["cost"] = run_cost(args, os.path.join(root, "cost"))
    if "parity" in parts:
      os.makedirs(os.path.join(root, "parity"))
      report["parity"] = run_parity(os.path.join(root, "parity"))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "eval_cost.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "eval_cost.md"), "w") as f:
    f.write(markdown(report))
  print(markdown(report))


if __name__ == "__main__":
  main()
