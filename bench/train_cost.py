r"""Cost of one training step: FLOPs and memory per device of the full config, measured step time of the demo.

    python bench/train_cost.py [--parts full,demo] [--cases g_f32,g_bf16_remat,g_bf16_remat_sp4,...]
        [--fsdp 1] [--platform cpu] [--budget_s 600] [--demo_repeats 5] [--demo_compare KEY=VALUE,...]
        [--out bench/results | FILE.json]

full: the paper's run, `configs/cvvae.py:sd21,full` (SD2.1 CV-VAE 128-256-512-512 x 2 res blocks, LPIPS, the
  frozen SD2.1 image VAE as the latent regularizer, the 3D PatchGAN), one 17x256x256 clip per device (global batch
  8 on 8 devices, the released recipe). Nothing is allocated: the state comes from `jax.eval_shape`, the batch is a
  `ShapeDtypeStruct`; `jit(step).lower(...)` gives XLA's FLOPs (`cost_analysis`, 2 per multiply-add), and
  `.compile().memory_analysis()` the buffers of one device: arguments (params, optimizer state, batch, frozen
  nets), outputs (the new state, aliased to the donated one) and temporaries (activations kept for the backward
  pass, gradients, workspace). Each case is compiled in its own process under `--budget_s` (full-size 3D convs take
  minutes for XLA:CPU); a case that runs out of time keeps its FLOPs. Cases: `g_`/`d_` the generator or
  discriminator update, `f32`/`bf16` `config.train.compute_dtype`; `_remat` `config.train.remat="full"` (the
  policy with the least memory, `models/remat.py`), `_rematblocks` "blocks", `_rematconvs` "full_save_convs",
  `_remathalves` "full_halves";
  `_nolpips` / `_noreg` switch LPIPS / the image-decoder regularizer off (what they hold); `_mb<N>` sets
  `config.train.image_micro_batch=N` (images per micro-batch; the config's 1, `_mb0` all 8 at once); `--fsdp K`
  compiles on K fake CPU devices with the parameters and optimizer state split over them (`config.mesh.fsdp=K`).
  `img_` cases: the image stream (8 images of 320x320 per device, the released recipe). `_sp<K>`: the trainer's
  spatial axis, `config.mesh.spatial=K`: one clip on K devices (times `--fsdp`), its height split over them (the
  batch `P(("data", "fsdp"), None, "spatial")`, the models' activation constraints of `train/sharding.py`; XLA
  partitions the convolutions with halo exchanges; parameters and optimizer state split over `fsdp x spatial`,
  the parameters gathered for the step's compute: `sharding.param_axes`, `sharding.params_at_use`).
demo: `configs/cvvae.py:sd21,demo` on this CPU, one device, random weights (the demo image VAE architecture as the
  regularizer, the packaged LPIPS): compile time, median step time of `--demo_repeats` calls after one warm-up,
  FLOPs and GFLOP/s of each of the four programs the demo runs (generator/discriminator x clip/image batch), and
  their ratio to numpy's fp32 matmul rate measured at the start of the same run. `--demo_compare
  loss.perceptual_frames=0` measures the demo config a second time with those config overrides (a worker of its
  own, after the first), side by side with the first: the same programs before and after a setting.

Writes `<out>/train_cost.json` and `<out>/train_cost.md` (or `FILE.json` and `FILE.md`). Interpretation and
accelerator estimates: bench/README_train.md and docs/scale.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FULL_CASES = ("g_f32,g_f32_remat,g_bf16,g_bf16_rematblocks,g_bf16_remat,g_bf16_remat_sp4,g_bf16_remat_sp8,"
                      "img_g_bf16_remat,d_bf16_remat")
CLIP = (17, 256, 256)   # per device, the released video recipe
IMAGES = (8, 320, 320)  # per device: the released image stream (global batch 64 on 8 devices)
# XLA:CPU's default (concurrency-optimized) scheduler hoists rematerialized computations next to the forward pass,
# so `memory_analysis` shows no saving from remat; the memory-minimizing scheduler (as on TPU/GPU, which schedule
# under a memory limit) does. Compile times are measured with it too.
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _gib(n) -> float | None:
  return None if n is None else round(n / 2**30, 3)


def _flops(analysis) -> float | None:
  if analysis is None:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", 0.0)) or None


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: _gib(getattr(m, f"{k}_size_in_bytes", None)) for k in ("argument", "output", "alias", "temp",
                                                                     "generated_code")}
  # Live at once on a device: arguments + temporaries + outputs that are not aliased to (donated) arguments.
  out["peak_estimate"] = round(out["argument"] + out["temp"] + max(out["output"] - out["alias"], 0.0), 3)
  return out


# Case words after the dtype: a remat policy (`remat` is the best one for memory, `full`), a spatial split, and
# loss parts switched off to see what they hold.
REMAT_WORDS = {"remat": "full", "rematblocks": "blocks", "rematconvs": "full_save_convs",
               "remathalves": "full_halves"}
OFF_WORDS = {"nolpips": "perceptual_weight", "noreg": "reg_decoder_weight"}


def _parse_case(name: str) -> dict:
  """`[img_](g|d)_(f32|bf16)[_remat|_rematblocks|_rematconvs|_remathalves][_sp<K>][_mb<N>][_nolpips][_noreg]`,
  e.g. `g_bf16_remat_sp4`, `img_g_bf16_remat_mb0`."""
  words = name.split("_")
  image = words[0] == "img"
  if image:
    words = words[1:]
  sp = [w for w in words[2:] if w.startswith("sp") and w[2:].isdigit()]
  mb = [w for w in words[2:] if w.startswith("mb") and w[2:].isdigit()]
  remat = [w for w in words[2:] if w in REMAT_WORDS]
  if (len(words) < 2 or words[0] not in ("g", "d") or words[1] not in ("f32", "bf16")
      or set(words[2:]) - {*REMAT_WORDS, *OFF_WORDS, *sp, *mb} or len(sp) > 1 or len(mb) > 1
      or len(remat) > 1 or (image and sp)):
    raise ValueError(f"--cases: expected cases like g_f32, d_bf16_remat, g_bf16_remat_sp4, g_bf16_rematblocks, "
                     f"g_bf16_remat_nolpips, img_g_f32, img_g_bf16_remat_mb0; got {name!r}")
  return dict(name=name, update={"g": "generator", "d": "discriminator"}[words[0]], dtype={
      "f32": "float32", "bf16": "bfloat16"}[words[1]], remat=REMAT_WORDS[remat[0]] if remat else "none",
              image=image, spatial=int(sp[0][2:]) if sp else 1, image_micro_batch=int(mb[0][2:]) if mb else None,
              off=[OFF_WORDS[w] for w in words[2:] if w in OFF_WORDS])


# ------------------------------------------------------------------------------------------------------- workers


def worker_full(case_name: str, fsdp: int, compile_: bool) -> dict:
  """One full-config case in this process (XLA_FLAGS set by the parent for the devices it needs)."""
  import jax
  import jax.numpy as jnp

  from configs import cvvae as cvvae_config
  from cvvae_jax.models import lpips, remat as remat_lib
  from cvvae_jax.models.sd_vae import ImageVAE
  from cvvae_jax.train import build, sharding, step as step_lib
  from cvvae_jax.train.state import init_state

  case = _parse_case(case_name)
  sp = case["spatial"]
  devices = fsdp * sp
  config = cvvae_config.get_config("sd21,full")
  with config.unlocked():
    config.train.compute_dtype = case["dtype"]
    config.train.remat = case["remat"]
    if case["image_micro_batch"] is not None:
      config.train.image_micro_batch = case["image_micro_batch"]
    case["image_micro_batch"] = config.train.image_micro_batch  # the row says the value used
    # XLA:CPU as the proxy of the accelerator program (3D convolutions, micro-batches in a scan), not of the CPU
    # forms. The upsampling stays sub-pixel, as measured before `upsample_impl` existed (accelerators' "auto": xla).
    config.train.conv_impl, config.train.upsample_impl, config.train.accum_loop = "xla", "subpixel", "scan"
    for weight in case["off"]:
      config.loss[weight] = 0.0
    config.mesh.data, config.mesh.fsdp, config.mesh.spatial = 1, fsdp, sp
  image_vae = ImageVAE()  # SD2.1's image VAE (diffusers AutoencoderKL config), the frozen regularizer
  if len(jax.devices()) < devices:
    raise ValueError(f"{case_name}: needs {devices} devices, {jax.devices()[0].platform} has {len(jax.devices())}")
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:devices])
  models = build.build_models(config, image_vae, sharding.activation_sharding(mesh))
  frozen = {"lpips": lpips.lpips_param_shapes(),
            "image_vae": jax.eval_shape(image_vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]}
  abstract = jax.eval_shape(functools.partial(init_state, models), jax.random.PRNGKey(0))
  state_sh = sharding.state_shardings(abstract, mesh)
  frozen_sh = sharding.param_shardings(frozen, mesh)
  update = step_lib.Update(case["update"])
  per_device = (IMAGES[0], 1, *IMAGES[1:]) if case["image"] else (1, CLIP[0], CLIP[1] // sp, CLIP[2])
  sharding.check_spatial_size(CLIP[1:], mesh, len(config.model.block_out_channels), f"{case_name}: the clip")
  # One clip (or image batch) per `fsdp` device, each on `sp` devices.
  global_batch = (per_device[0] * fsdp, per_device[1], per_device[2] * sp, per_device[3])
  batch = {"video": jax.ShapeDtypeStruct((*global_batch, 3), jnp.float32)}

  def program(models):  # the trainer's program
    return step_lib.TrainStep(models, mesh, state_sh, frozen_sh)._fns[update]  # pylint: disable=protected-access

  fn = program(models)

  count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  out = dict(case=case_name, **case, devices=devices, per_device_batch=list(per_device),
             params_vae=count(abstract.params["vae"]), params_disc=count(abstract.disc_params),
             params_frozen=count(frozen))
  t = time.perf_counter()
  lowered = fn.lower(abstract, batch, jax.ShapeDtypeStruct((2,), jnp.uint32), frozen)
  out["lower_s"] = round(time.perf_counter() - t, 1)
  out["flops_per_device"] = _flops(lowered.cost_analysis())
  looped = ((remat_lib.covers(case["remat"], "loss") and case["update"] == "generator")
            or step_lib.micro_batches(models, batch["video"].shape, mesh) > 1)
  if looped:
    # XLA counts a loop body once: count the loss networks' frame loop and the micro-batches as one call.
    unlooped = program(dataclasses.replace(models, remat_frames=0, image_micro_batch=0, grad_accum_steps=1))
    out["flops_per_device"] = _flops(unlooped.lower(abstract, batch, jax.ShapeDtypeStruct((2,), jnp.uint32),
                                                    frozen).cost_analysis())
  out["flops_per_device"] = out["flops_per_device"] and out["flops_per_device"] / devices  # of the global program
  print(json.dumps({"partial": out}), flush=True)  # kept if the compile runs out of time
  if compile_:
    t = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = round(time.perf_counter() - t, 1)
    out["memory_gib"] = _memory(compiled)
    out["flops_per_device_compiled"] = _flops(compiled.cost_analysis())
    out["peak_gib"], out["temp_gib"] = out["memory_gib"]["peak_estimate"], out["memory_gib"]["temp"]
  # The partitioned program's count where there is one, except for loops (counted from the lowered one-call program
  # above).
  flops = out["flops_per_device"]
  if not looped:
    flops = out.get("flops_per_device_compiled") or flops
  out["tflop_per_device"] = flops and round(flops / 1e12, 3)
  return out


def apply_overrides(config, overrides: str) -> None:
  """'loss.perceptual_frames=0,train.remat="full"' -> sets those fields of `config` (values as Python literals)."""
  import ast
  for item in filter(None, (i.strip() for i in overrides.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"expected KEY=VALUE in --demo_compare, got {item!r}")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"--demo_compare: the demo config has no field {key!r}")
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value  # a bare string


def worker_demo(repeats: int, overrides: str = "") -> dict:
  """The demo config's four programs on this CPU (one device), random weights; `overrides` as `apply_overrides`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import cvvae as cvvae_config, image_vae as image_vae_config
  from cvvae_jax.models import lpips
  from cvvae_jax.train import build, sharding, step as step_lib
  from cvvae_jax.train.state import init_state

  config = cvvae_config.get_config("sd21,demo")
  apply_overrides(config, overrides)
  image_vae = build.build_vae(image_vae_config.get_config("sd21,demo").model)
  models = build.build_models(config, image_vae)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  frozen = {"lpips": lpips.load_lpips_params(),
            "image_vae": jax.jit(image_vae.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]}
  state_sh = sharding.state_shardings(jax.eval_shape(functools.partial(init_state, models),
                                                     jax.random.PRNGKey(0)), mesh)
  frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen), mesh)
  frozen = jax.device_put(frozen, frozen_sh)
  step_fn = step_lib.TrainStep(models, mesh, state_sh, frozen_sh)
  state = jax.jit(functools.partial(init_state, models), out_shardings=state_sh)(jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(0)
  rows = []
  streams = sorted(config.data.streams, key=lambda n: n != "video")  # the clip stream first
  for stream in streams:
    s = config.data.streams[stream]
    shape = (s.batch_size, s.frames, *s.size, 3)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    batch = sharding.shard_host_batch({"video": x}, mesh)
    for update in (step_lib.Update.GENERATOR, step_lib.Update.DISCRIMINATOR):
      fn = step_fn._fns[update]  # pylint: disable=protected-access
      t = time.perf_counter()
      compiled = fn.lower(state, batch, rng, frozen).compile()
      compile_s = time.perf_counter() - t
      flops = _flops(compiled.cost_analysis())

      def median_step_s(at_step: int) -> float:
        st = state.replace(step=jnp.asarray(at_step, jnp.int32))
        times = []
        for i in range(repeats + 1):
          st_in = jax.tree_util.tree_map(jnp.copy, st)  # the step donates its state
          jax.block_until_ready(st_in)
          t = time.perf_counter()
          out_state, metrics = compiled(st_in, batch, rng, frozen)
          jax.block_until_ready((out_state, metrics))
          if i:
            times.append(time.perf_counter() - t)
        return float(np.median(times))

      # Steps after disc_start (the GAN term and its adaptive weight on): the costlier branch of the step, the one
      # XLA's FLOP count describes (it counts both branches of a cond). The generator before disc_start (its
      # discriminator and adaptive-weight branches skipped) is timed too; no FLOP rate for it.
      step_s = median_step_s(config.loss.disc_start)
      pre_gan_s = median_step_s(0) if update is step_lib.Update.GENERATOR else None
      rows.append(dict(stream=stream, batch=list(shape), update=update.value, compile_s=round(compile_s, 1),
                       step_s=round(step_s, 3), pre_gan_step_s=pre_gan_s and round(pre_gan_s, 3), flops=flops,
                       gflops_per_s=round(flops / step_s / 1e9, 1) if flops else None, memory_gib=_memory(compiled)))
      print(json.dumps({"partial": rows[-1]}), flush=True)
  return {"rows": rows, "mix": {n: float(config.data.streams[n].weight) for n in streams},
          "gan_phase": bool(config.loss.disc_start < config.train.num_steps)}


def matmul_gflops() -> float:
  """numpy's fp32 matmul rate, the reference rate of all benchmarks here (`bench/vae_speed.py`)."""
  sys.path.insert(0, REPO)
  from bench import vae_speed
  return round(vae_speed.matmul_gflops(), 1)


def run_worker(args: list[str], env_extra: dict[str, str], budget_s: float) -> tuple[dict | None, str]:
  """Runs this script as a worker; returns (its final JSON or the last partial one, status)."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = proc.communicate(timeout=budget_s)
    status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode}): {stderr.strip().splitlines()[-1:]}"
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
    status = f"out of time ({budget_s:.0f} s)"
  result = None
  for line in stdout.splitlines():
    if line.startswith("{"):
      obj = json.loads(line)
      result = obj.get("result", obj.get("partial"))
  return result, status


def demo_report(result: dict | None, status: str, overrides: str) -> dict:
  """A demo worker's rows, with the mean step time of the demo's stream mix: G and D alternating after disc_start,
  or, for a run without a GAN phase (disc_start past its last step), every step a pre-GAN generator step."""
  out = dict(rows=result["rows"] if result and "rows" in result else ([result] if result else []),
             status=status, mix=(result or {}).get("mix"), overrides=overrides,
             gan_phase=(result or {}).get("gan_phase", True))
  rows = {(r["stream"], r["update"]): r for r in out["rows"]}
  mix = out["mix"]
  if mix and len(rows) == 2 * len(mix):
    total = sum(mix.values())
    if out["gan_phase"]:
      per_stream = {s: (rows[(s, "generator")]["step_s"] + rows[(s, "discriminator")]["step_s"]) / 2 for s in mix}
    else:
      per_stream = {s: rows[(s, "generator")]["pre_gan_step_s"] for s in mix}
    out["mean_step_s"] = sum(mix[s] / total * per_stream[s] for s in mix)
  return out


def _fmt(x, digits=2):
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


CHIPS = (("TPU v5e", 16.0), ("TPU v4", 32.0), ("H100 80 GB", 74.5))  # memory per chip, GiB
FIT_RULE = "yes up to 85 % of the chip's memory, tight up to 100 %, else no"


def fit(peak_gib: float, chip_gib: float) -> str:
  """Whether a per-device peak fits a chip, by `FIT_RULE` (a margin for the target compiler's layouts)."""
  share = peak_gib / chip_gib
  return "yes" if share <= 0.85 else f"tight ({100 * share:.0f} %)" if share <= 1 else "no"


def write_markdown(path: str, report: dict) -> None:
  lines = [f"# Training step cost ({report['machine']}, jax {report['jax']})", "",
           f"numpy fp32 matmul: {report['matmul_gflops']} GFLOP/s (machine load at the start: "
           f"{report['load']})", ""]
  if report.get("full"):
    lines += ["## Full config (sd21,full), per device", "",
              "| case | per-device input | devices | TFLOP/step/device (ideal / compiled, loop bodies once) | args GiB "
              "| temp GiB | out-alias GiB | peak est. GiB | compile s | status |", "|---" * 10 + "|"]
    for r in report["full"]:
      m = r.get("memory_gib") or {}
      lines.append(f"| {r['case']} | {'x'.join(map(str, r['per_device_batch']))} | {r.get('devices')} | "
                   f"{_fmt(r['flops_per_device'] and r['flops_per_device'] / 1e12)} / "
                   f"{_fmt(r.get('flops_per_device_compiled') and r['flops_per_device_compiled'] / 1e12)} | "
                   f"{_fmt(m.get('argument'))} | "
                   f"{_fmt(m.get('temp'))} | {_fmt(max(m['output'] - m['alias'], 0.0) if m else None)} | "
                   f"{_fmt(m.get('peak_estimate'))} | {_fmt(r.get('compile_s'), 0)} | {r['status']} |")
    lines += ["", f"Which chips one device's peak fits ({FIT_RULE}):", "",
              "| case | peak est. GiB | " + " | ".join(f"{n} ({c:g} GiB)" for n, c in CHIPS) + " |",
              "|---|---|" + "---|" * len(CHIPS)]
    for r in report["full"]:
      peak = (r.get("memory_gib") or {}).get("peak_estimate")
      if peak is not None:
        lines.append(f"| {r['case']} | {peak:.2f} | " + " | ".join(fit(peak, c) for _, c in CHIPS) + " |")
    lines.append("")
  for key, title in (("demo", "Demo config (sd21,demo) on this CPU, one device"),
                     ("demo_compare", f"The same with {report.get('demo_compare', {}).get('overrides')}")):
    if not report.get(key):
      continue
    lines += [f"## {title}", "",
              "| stream | batch | update | compile s | step s (GAN on) | GFLOP/step | GFLOP/s | x matmul | temp GiB "
              "| pre-GAN step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report[key]["rows"]:
      ratio = r["gflops_per_s"] and r["gflops_per_s"] / report["matmul_gflops"]
      lines.append(f"| {r['stream']} | {'x'.join(map(str, r['batch']))} | {r['update']} | {r['compile_s']} | "
                   f"{r['step_s']} | {_fmt(r['flops'] and r['flops'] / 1e9, 1)} | {_fmt(r['gflops_per_s'], 1)} | "
                   f"{_fmt(ratio)} | {_fmt(r['memory_gib']['temp'], 3)} | {_fmt(r.get('pre_gan_step_s'), 3)} |")
    if report[key].get("mean_step_s") is not None:
      how = ("G and D alternating after disc_start" if report[key].get("gan_phase", True)
             else "no GAN phase: every step a pre-GAN generator step")
      lines += ["", f"Mean step time of the demo's mix (streams drawn {report[key]['mix']}, {how}): "
                f"{report[key]['mean_step_s']:.3f} s"]
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="full,demo")
  parser.add_argument("--cases", "--full_cases", dest="full_cases", default=DEFAULT_FULL_CASES,
                      help="comma-separated full-config cases (see the module docstring)")
  parser.add_argument("--fsdp", type=int, default=1,
                      help="devices the parameters (and the batch: one clip each) are split over")
  parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "tpu"),
                      help="backend of the workers: cpu uses fake devices; on gpu/tpu the first --fsdp (or K) "
                           "real devices, and `memory_analysis` is that compiler's")
  parser.add_argument("--budget_s", type=float, default=600, help="seconds per worker process")
  parser.add_argument("--lower_only", action="store_true", help="full config: FLOPs only, no compile")
  parser.add_argument("--demo_repeats", type=int, default=5)
  parser.add_argument("--demo_compare", default="",
                      help="config overrides KEY=VALUE[,KEY=VALUE] of a second demo measurement, side by side")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"),
                      help="a folder (train_cost.json + train_cost.md in it) or a FILE.json (FILE.md beside it)")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._worker:  # pylint: disable=protected-access
    kind, _, name = args._worker.partition(":")
    result = (worker_full(name, args.fsdp, not args.lower_only) if kind == "full"
              else worker_demo(args.demo_repeats, args.demo_compare))
    print(json.dumps({"result": result}), flush=True)
    return 0

  import jax

  parts = [p for p in args.parts.split(",") if p]
  report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "platform": args.platform, "jax": jax.__version__,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()), "matmul_gflops": matmul_gflops()}
  if "full" in parts:
    report["full"] = []
    for name in filter(None, args.full_cases.split(",")):
      devices = args.fsdp * _parse_case(name)["spatial"]
      extra = {"JAX_PLATFORMS": args.platform}
      if args.platform == "cpu":
        extra["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {MEMORY_SCHEDULER}"
      t = time.time()
      result, status = run_worker(["--_worker", f"full:{name}", "--fsdp", str(args.fsdp)]
                                  + (["--lower_only"] if args.lower_only else []), extra, args.budget_s)
      row = dict(result or {"case": name, "per_device_batch": [], "devices": devices, "flops_per_device": None},
                 status=status, wall_s=round(time.time() - t, 1))
      report["full"].append(row)
      print(json.dumps(row), flush=True)
  if "demo" in parts:
    for key, overrides in (("demo", ""), ("demo_compare", args.demo_compare))[:2 if args.demo_compare else 1]:
      result, status = run_worker(["--_worker", "demo", "--demo_repeats", str(args.demo_repeats),
                                   "--demo_compare", overrides], {"JAX_PLATFORMS": args.platform}, args.budget_s)
      report[key] = demo_report(result, status, overrides)
      print(json.dumps(report[key]), flush=True)
  json_path = args.out if args.out.endswith(".json") else os.path.join(args.out, "train_cost.json")
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(report, f, indent=1)
  md_path = json_path[:-len(".json")] + ".md"
  write_markdown(md_path, report)
  print(open(md_path).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
