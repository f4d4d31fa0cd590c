"""Speed and memory of our jitted encode/decode against the PyTorch implementations, same weights, same machine.

    python bench/vae_speed.py [--original_repo /path/to/CV-VAE] [--cases image_vae_256,cvvae_9x64x64,cvvae_17x128x128]
        [--repeats 3] [--threads 2] [--out bench/results]

Cases (batch 1, fp32, full-size architectures with random weights: speed and memory do not depend on the values):
  image_vae_256      SD2.1 image VAE at 256x256: ours vs diffusers `AutoencoderKL` (eager).
  cvvae_9x64x64      CV-VAE SD2.1 at 9x64x64: ours vs the original CV-VAE code (`--original_repo`; skipped if absent).
  cvvae_17x128x128   CV-VAE SD2.1 at 17x128x128: idem.
Both sides load one folder written by `cvvae_jax.save_pretrained`. Every (case, side, direction) runs in its own
process; ours twice, the second time holding only the params the call reads (`ours_used`: torch's memory-mapped
weights are resident only where a call touches them). "model RSS" is the RSS after loading; the peak RSS (VmHWM)
is reset after loading, so "peak RSS" is the high-water mark of compile + runs (at least the model RSS), and "load
peak" that of loading (conversion transients).
Ours: `jax.jit` of the plain encode (posterior mean) / decode; compile time is reported separately; run times are the
median of `--repeats` calls after the compile. Theirs: `torch.inference_mode`, `torch.set_num_threads(--threads)`,
one warm-up call, then the median of `--repeats`. FLOPs: torch's FlopCounterMode (convolutions and matmuls, 2 per
MAC) on the torch side, XLA's cost analysis on ours. A numpy fp32 matmul rate is measured before every pair of runs
(the machine may be shared: compare only numbers measured side by side). Then a third process loads both sides and
alternates their calls (`--pair_repeats`, best and median of each): its time ratio is the one to trust when other
jobs load the machine, since separate processes run minutes apart under different load. Writes `<out>/vae_speed.json` and
`<out>/vae_speed.md`.
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
CASES = {
    "image_vae_256": dict(model="image", shape=(1, 256, 256, 3)),
    "cvvae_9x64x64": dict(model="cvvae", shape=(1, 9, 64, 64, 3)),
    "cvvae_17x128x128": dict(model="cvvae", shape=(1, 17, 128, 128, 3)),
}


def _status_mb(key: str) -> float:
  """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB. (`ru_maxrss` would include the parent's peak
  from before exec.)"""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _current_rss_mb() -> float:
  return _status_mb("VmRSS")


def _rss_mb() -> float:
  return _status_mb("VmHWM")


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5), so that a later peak excludes loading transients."""
  import gc
  gc.collect()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  a @ a
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times) / 1e9


def latent_shape(case: dict) -> tuple[int, ...]:
  shape = case["shape"]
  if case["model"] == "image":
    return (shape[0], shape[1] // 8, shape[2] // 8, 4)
  return (shape[0], (shape[1] - 1) // 4 + 1, shape[2] // 8, shape[3] // 8, 4)


# ---------------------------------------------------------------------------------------------------------------
# Workers (one process each).


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of `fn(*args)` (2 per multiply-add). Give it the model with `conv_impl="xla"`: XLA's cost
  analysis counts a loop body once, and on CPU large 3D convolutions loop over frames (`conv_impl="auto"`)."""
  import jax

  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _release_freed_memory() -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim`), so that RSS shows what is still allocated."""
  import ctypes
  import gc

  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def worker_ours(folder: str, case: dict, direction: str, repeats: int, used_only: bool = False) -> dict:
  """Ours in its own process. `used_only`: keep only the params the call reads (`inference.params_for`: the encoder
  for an encode), as torch's lazily mapped safetensors weights only become resident when a call touches them."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import cvvae_jax
  from cvvae_jax import inference

  model, params = cvvae_jax.load_pretrained(folder)
  shape = case["shape"] if direction == "encode" else latent_shape(case)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
  if direction == "encode":
    call_of = lambda m: lambda p, x: m.apply({"params": p}, x, method="encode").mean
  else:
    call_of = lambda m: lambda p, z: m.apply({"params": p}, z, method="decode")
  call = call_of(model)
  fn = jax.jit(call)
  if used_only:
    params = inference.params_for(params, direction)
  params = jax.device_put(params)
  # Its own compilation (before the peak-RSS reset, like loading), of the same math without the frame loop.
  flops = xla_flops(call_of(model.clone(conv_impl="xla")), params, x)
  _release_freed_memory()
  load_peak = _rss_mb()
  _reset_peak_rss()
  model_rss = _current_rss_mb()
  t = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else float("nan")
  compiled(params, x).block_until_ready()  # first run (allocations)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    compiled(params, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return dict(side="ours_used" if used_only else "ours", params_kept=sorted(params), compile_s=compile_s,
              times_s=times, median_s=statistics.median(times), flops=flops,
              model_rss_mb=model_rss, peak_rss_mb=_rss_mb(), load_peak_rss_mb=load_peak, xla_temp_mb=temp_mb,
              jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))


def worker_torch(folder: str, case: dict, direction: str, repeats: int, threads: int, original_repo: str) -> dict:
  import numpy as np
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  torch.set_num_threads(threads)
  if case["model"] == "image":
    from diffusers import AutoencoderKL
    model = AutoencoderKL.from_pretrained(folder).eval()
    impl = "diffusers AutoencoderKL"
  else:
    sys.path.insert(0, REPO)
    from bench import torch_original
    cls = torch_original.load_original_class(original_repo)
    model = cls.from_pretrained(folder).eval()
    impl = "original CV-VAE CVVAEModel"
  shape = case["shape"] if direction == "encode" else latent_shape(case)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  x = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # channels-first
  if direction == "encode":
    call = lambda: model.encode(x).latent_dist.mean
  else:
    call = lambda: model.decode(x).sample
  load_peak = _rss_mb()
  _reset_peak_rss()
  model_rss = _current_rss_mb()
  with torch.inference_mode():
    counter = FlopCounterMode(display=False)
    t = time.perf_counter()
    with counter:  # the warm-up call also counts FLOPs
      call()
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      call()
      times.append(time.perf_counter() - t)
  return dict(side="torch", impl=impl, warmup_s=warmup_s, times_s=times, median_s=statistics.median(times),
              flops=float(counter.get_total_flops()), model_rss_mb=model_rss, peak_rss_mb=_rss_mb(),
              load_peak_rss_mb=load_peak,
              torch=torch.__version__, threads=torch.get_num_threads())


def worker_pair(folder: str, case: dict, direction: str, repeats: int, threads: int, original_repo: str) -> dict:
  """Both sides in one process, calls alternated (ours, torch, ours, torch, ...): load from other jobs on the machine
  then hits both alike, so the time ratio is meaningful even when absolute times drift. (RSS is per side, measured by
  the separate workers.) Also checks that both give the same output."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import cvvae_jax

  torch.set_num_threads(threads)
  model, params = cvvae_jax.load_pretrained(folder)
  params = jax.device_put(params)
  if case["model"] == "image":
    from diffusers import AutoencoderKL
    theirs = AutoencoderKL.from_pretrained(folder).eval()
  else:
    sys.path.insert(0, REPO)
    from bench import torch_original
    theirs = torch_original.load_original_class(original_repo).from_pretrained(folder).eval()
  shape = case["shape"] if direction == "encode" else latent_shape(case)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  xj, xt = jnp.asarray(x), torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  if direction == "encode":
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode").mean).lower(params, xj).compile()
    call = lambda: theirs.encode(xt).latent_dist.mean
  else:
    ours = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode")).lower(params, xj).compile()
    call = lambda: theirs.decode(xt).sample
  times = dict(ours=[], torch=[])
  with torch.inference_mode():
    diff = float(np.max(np.abs(np.asarray(ours(params, xj)) - np.moveaxis(call().numpy(), 1, -1))))  # warm-up
    for _ in range(repeats):
      t = time.perf_counter()
      ours(params, xj).block_until_ready()
      times["ours"].append(time.perf_counter() - t)
      t = time.perf_counter()
      call()
      times["torch"].append(time.perf_counter() - t)
  return dict(side="pair", times_s=times, max_abs_diff=diff, loadavg_end=os.getloadavg(),
              best_ratio=min(times["ours"]) / min(times["torch"]),
              median_ratio=statistics.median(times["ours"]) / statistics.median(times["torch"]))


# ---------------------------------------------------------------------------------------------------------------
# Driver.


def make_folder(kind: str, root: str) -> str:
  import cvvae_jax
  from tests.helpers import random_params

  if kind == "image":
    model = cvvae_jax.ImageVAE()  # SD2.1 config: 128/256/512/512, 4 latent channels, quant convs
  else:
    model = cvvae_jax.CVVAE(variant="sd21")
  path = os.path.join(root, kind)
  cvvae_jax.save_pretrained(model, random_params(model, seed=0), path)
  return path


def run_worker(args, side: str, case_name: str, direction: str, folder: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--case", case_name, "--direction", direction,
         "--folder", folder, "--repeats", str(args.repeats), "--pair_repeats", str(args.pair_repeats),
         "--threads", str(args.threads),
         "--original_repo", args.original_repo]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             OMP_NUM_THREADS=str(args.threads))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(side=side, error=(proc.stderr or proc.stdout)[-2000:])
  return json.loads(lines[-1])


def machine() -> dict:
  info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count())
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
    info["cpu"] = next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name"))
    flags = next(l for l in text.splitlines() if l.startswith("flags")).split()
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    with open("/proc/meminfo") as f:
      info["mem_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    info["loadavg_at_start"] = os.getloadavg()
  except (OSError, StopIteration):
    pass
  return info


_SIDE_NAMES = dict(ours="ours", ours_used="ours, used params only", torch="torch")


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = ["# VAE speed: ours (JAX/XLA) vs PyTorch, fp32, batch 1", "",
           f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB, ISA {m.get('isa')}; "
           f"{m.get('platform')}. Load average at start: {m.get('loadavg_at_start')}. Command: `{result['command']}`.",
           "", "Time: median of the timed calls (ours after compile; compile separately). GFLOP/s with each side's "
           "own FLOP count; `% mm` is that rate over the numpy fp32 matmul rate measured just before the pair. RSS: "
           "high-water mark during compile and runs, reset after loading (model RSS = after loading). \"used params "
           "only\": ours holding just the part of the weights the call reads (the encoder for an encode; torch's "
           "memory-mapped weights become resident only when touched); its time is one call.", "",
           "| case | dir | side | time s | compile s | ratio ours/theirs | GFLOP | GFLOP/s | % mm | peak RSS MB | "
           "model RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in result["rows"]:
    for side in ("ours", "ours_used", "torch"):
      r = row.get(side)
      if r is None:
        continue
      if "error" in r or "skipped" in r:
        lines.append(f"| {row['case']} | {row['direction']} | {side} | {r.get('skipped') or 'error'} | | | | | | | |")
        continue
      gf = r["flops"] / 1e9
      rate = gf / r["median_s"]
      ratio = row.get("time_ratio_ours_over_torch")
      lines.append(
          f"| {row['case']} | {row['direction']} | {_SIDE_NAMES[side]}"
          f"{' (' + r['impl'] + ')' if side == 'torch' else ''} | "
          f"{r['median_s']:.3f} | {r.get('compile_s', float('nan')):.1f} | "
          f"{'' if ratio is None or side != 'ours' else f'{ratio:.2f}'} | {gf:.1f} | {rate:.1f} | "
          f"{100 * rate / row['matmul_gflops']:.0f}% | {r['peak_rss_mb']:.0f} | {r['model_rss_mb']:.0f} |")
  lines += ["", f"numpy fp32 matmul rates measured (GFLOP/s): {[round(r['matmul_gflops'], 1) for r in result['rows']]}"]
  pairs = [row for row in result["rows"] if "pair" in row]
  if pairs:
    lines += ["", "Time, both sides in one process with calls alternated (the ratio to trust on a shared machine):", "",
              "| case | dir | ours best / median s | torch best / median s | ours/torch best | ours/torch median | "
              "max abs diff | load at end |", "|---|---|---|---|---|---|---|---|"]
    for row in pairs:
      r = row["pair"]
      if "error" in r:
        lines.append(f"| {row['case']} | {row['direction']} | error | | | | | |")
        continue
      o, t = r["times_s"]["ours"], r["times_s"]["torch"]
      lines.append(f"| {row['case']} | {row['direction']} | {min(o):.2f} / {statistics.median(o):.2f} | "
                   f"{min(t):.2f} / {statistics.median(t):.2f} | {r['best_ratio']:.2f} | {r['median_ratio']:.2f} | "
                   f"{r['max_abs_diff']:.1e} | {r['loadavg_end'][0]:.1f} |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--directions", default="encode,decode")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--original_repo", default=os.environ.get("CVVAE_ORIGINAL_REPO", ""))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  p.add_argument("--tag", default="", help="suffix of the result files")
  p.add_argument("--pair_repeats", type=int, default=5, help="alternated calls per side in the one-process pair run "
                 "(0: skip it)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--case", default="", help=argparse.SUPPRESS)
  p.add_argument("--direction", default="", help=argparse.SUPPRESS)
  p.add_argument("--folder", default="", help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    case = CASES[args.case]
    if args.worker in ("ours", "ours_used"):
      used_only = args.worker == "ours_used"  # for its memory: one timed call
      out = worker_ours(args.folder, case, args.direction, 1 if used_only else args.repeats, used_only=used_only)
    elif args.worker == "pair":
      out = worker_pair(args.folder, case, args.direction, args.pair_repeats, args.threads, args.original_repo)
    else:
      out = worker_torch(args.folder, case, args.direction, args.repeats, args.threads, args.original_repo)
    print(json.dumps(out))
    return

  sys.path.insert(0, REPO)
  from bench import torch_original
  have_original = torch_original.load_original_class(args.original_repo) is not None if args.original_repo else False
  root = tempfile.mkdtemp(prefix="vae_speed_")
  folders = {}
  rows = []
  for case_name in args.cases.split(","):
    case = CASES[case_name]
    if case["model"] not in folders:
      folders[case["model"]] = make_folder(case["model"], root)
    for direction in args.directions.split(","):
      row = dict(case=case_name, direction=direction, shape=list(case["shape"] if direction == "encode"
                                                                   else latent_shape(case)))
      row["matmul_gflops"] = matmul_gflops()
      row["ours"] = run_worker(args, "ours", case_name, direction, folders[case["model"]])
      row["ours_used"] = run_worker(args, "ours_used", case_name, direction, folders[case["model"]])
      if case["model"] == "cvvae" and not have_original:
        row["torch"] = dict(side="torch", skipped="original CV-VAE code not given (--original_repo PATH)")
      else:
        row["torch"] = run_worker(args, "torch", case_name, direction, folders[case["model"]])
      if args.pair_repeats and "skipped" not in row["torch"]:
        row["pair"] = run_worker(args, "pair", case_name, direction, folders[case["model"]])
      ours, theirs = row["ours"], row["torch"]
      if "median_s" in ours and "median_s" in theirs:
        row["time_ratio_ours_over_torch"] = ours["median_s"] / theirs["median_s"]
        row["peak_rss_ratio_ours_over_torch"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        if "peak_rss_mb" in row["ours_used"]:
          row["peak_rss_ratio_ours_used_over_torch"] = row["ours_used"]["peak_rss_mb"] / theirs["peak_rss_mb"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  result = dict(machine=machine(), command="python " + " ".join(sys.argv), rows=rows,
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "vae_speed" + (f"_{args.tag}" if args.tag else ""))
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
