"""The evaluation run: `evaluate(cfg)` checks everything, then scores every batch on every device of every process
and writes every output (process 0 writes; every process computes the same report).

Each process reads its share of the clips (`data.create_eval_iterator`), the step runs on each device on its rows
(`jax.shard_map`: the same program as one device on a smaller batch, so per-clip values do not depend on the device
count), and the rows of every process are gathered and put back in dataset order before anything is added up.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cvvae_jax import data as data_lib
from cvvae_jax import paths as paths_lib
from cvvae_jax.eval import fvd as fvd_lib
from cvvae_jax.eval import plots
from cvvae_jax.eval.accumulator import Accumulator
from cvvae_jax.eval.compat import LatentCompat
from cvvae_jax.eval.config import METRICS, EvalConfig, EvaluationError
from cvvae_jax.eval.data import check_setup, data_config, resolve_data
from cvvae_jax.eval.models import Models, load_models
from cvvae_jax.eval.report import build_report, json_safe, write_markdown
from cvvae_jax.eval.step import make_features, make_step
from cvvae_jax.models import i3d, lpips


class _Progress:
  """A tqdm bar (with ETA) over batches, or nothing."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      self._bar = tqdm(total=total, unit="batch", desc="evaluate", file=sys.stderr, dynamic_ncols=True)

  def update(self, postfix: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(postfix, refresh=False)
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Devices:
  """The evaluation's mesh (axis "batch") and the moves between host rows and global arrays over it.

  Each process shards its `local_batch` rows over as many of its devices as divide it (at most `limit`; 0: all).
  """

  def __init__(self, local_batch: int, limit: int = 0):
    local = min(limit or jax.local_device_count(), jax.local_device_count())
    local = max(d for d in range(1, local + 1) if local_batch % d == 0)
    devices = [d for p in range(jax.process_count())
               for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:local]]
    self.mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    self.rows = NamedSharding(self.mesh, P("batch"))
    self.multi = jax.process_count() > 1

  def jit(self, fn, replicated: int = 2, sharded: int = 1):
    """`fn(*replicated_args, *sharded_args)` on each device on its rows: the first `replicated` arguments
    (parameters, frozen networks) on every device, the next `sharded` split by rows."""
    specs = (P(),) * replicated + (P("batch"),) * sharded
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P("batch"), check_vma=False))

  def put(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.rows, np.asarray(local))

  def get(self, tree: Any) -> Any:
    """Global arrays (or this process's host rows) -> numpy arrays of every process's rows, in process order."""
    return multihost_utils.process_allgather(tree, tiled=True) if self.multi else jax.device_get(tree)

  def strings(self, values: Sequence[str]) -> list[str]:
    """Every process's `values`, in process order."""
    if not self.multi:
      return list(values)
    encoded = [v.encode() for v in values]
    width = int(np.max(self.get(np.array([max([len(e) for e in encoded] + [1])]))))
    local = np.zeros((len(encoded), width), np.uint8)
    for i, e in enumerate(encoded):
      local[i, :len(e)] = np.frombuffer(e, np.uint8)
    return [bytes(row).rstrip(b"\0").decode() for row in self.get(local)]


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
  """Runs the whole evaluation and writes every output into `cfg.out` (process 0); returns the metrics.json content.
  A remote `cfg.out` (`gs://...`) gets them once complete, from a local temporary folder.

  Raises:
    EvaluationError: settings, models and data that do not fit (before any clip is read or anything compiled).
  """
  start = time.perf_counter()
  models = load_models(cfg)
  spec = resolve_data(cfg)
  check_setup(cfg, models, spec)
  for note in models.notes:
    logging.warning("evaluate: %s", note)
  logging.info("evaluate: compatibility metrics %s", models.compat_note)
  if cfg.batch_size % jax.process_count():
    raise EvaluationError(f"batch_size: expected a multiple of the {jax.process_count()} processes (it is the "
                          f"global batch), got {cfg.batch_size}")
  fvd_note = fvd_status(cfg, spec.kind)
  fvd_on = fvd_note.startswith("on")

  dcfg = data_config(cfg, spec)
  stats = data_lib.DataStats()
  try:
    eval_data = data_lib.create_eval_iterator(dcfg, stats=stats)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f"--data {cfg.data}: {e}") from e
  frozen = {"lpips": lpips.load_lpips_params(net=cfg.lpips_net)} if cfg.lpips else {}
  i3d_params = i3d.load_i3d_params() if fvd_on else None
  devices = Devices(cfg.batch_size // jax.process_count(), cfg.devices)
  step = devices.jit(make_step(models, cfg))
  rfvd_features = devices.jit(make_features(models), replicated=1, sharded=2) if fvd_on else None
  # On the host: a training workdir's params come committed to one device, the step replicates them over the mesh.
  params = {k: jax.device_get(e.params) for k, e in models.entries.items()}
  metric_names = [m for m in METRICS if m != "lpips" or cfg.lpips]
  lead = jax.process_index() == 0
  logging.info("evaluate: %d device(s) over %d process(es), rFVD %s", devices.mesh.size, jax.process_count(),
               fvd_note)

  out = tempfile.mkdtemp(prefix="cvvae_eval_") if paths_lib.is_remote(cfg.out) and lead else cfg.out
  samples_dir = os.path.join(out, "samples")
  acc, latent_stats, features = Accumulator(), LatentCompat(), {}
  pictures_written: list[str] = []
  num_batches = len(eval_data)
  if cfg.max_clips:
    num_batches = min(num_batches, math.ceil(cfg.max_clips / cfg.batch_size))
  progress = _Progress(num_batches, cfg.progress and lead)
  first_step_s = None
  batches = iter(eval_data)
  try:
    for batch in batches:
      if cfg.max_clips and acc.num_clips >= cfg.max_clips:
        break
      mask, index = devices.get((np.asarray(batch["mask"], bool), np.asarray(batch["index"], np.int64)))
      if not mask.any():
        progress.update("skipped batch")
        continue
      order = np.argsort(np.where(index < 0, np.iinfo(np.int64).max, index), kind="stable")  # dataset order
      paths = np.array(devices.strings(list(batch["path"])))[order]
      mask = mask[order]
      t0 = time.perf_counter()
      video = devices.put(batch["video"])
      scores, extras, pictures = step(params, frozen, video)
      if rfvd_features is not None:
        extras = {**extras, **rfvd_features(i3d_params, video, pictures)}
      scores, extras = jax.tree_util.tree_map(lambda a: a[order], devices.get((scores, extras)))
      if first_step_s is None:
        first_step_s = time.perf_counter() - t0
      before = acc.num_clips
      rows = np.flatnonzero(mask)[:acc.add(scores, paths, mask, limit=cfg.max_clips)]
      for name, value in extras.items():
        if name.startswith("fvd/"):
          features.setdefault(name.removeprefix("fvd/"), []).append(value[rows])
      if models.compat:
        latent_stats.add(extras["latents/cv"], extras["latents/image"], rows)
      if before < cfg.num_samples:  # the same on every process: the gathers below are collectives
        clips, pictures = jax.tree_util.tree_map(lambda a: a[order], devices.get((video, pictures)))
        for j, row in enumerate(rows[:cfg.num_samples - before]):
          if lead:
            pictures_written += plots.write_samples(samples_dir, before + j, clips[row],
                                                    {k: v[row] for k, v in pictures.items()}, models, cfg)
      psnr_now = np.mean(acc.clip_values("recon/model", "psnr"))
      progress.update(f"clips={acc.num_clips} psnr={psnr_now:.2f}")
  finally:
    progress.close()
    close = getattr(batches, "close", None)
    if close:
      close()
  skipped = gather_skipped(devices, stats)
  if acc.num_clips == 0:
    raise EvaluationError(f"--data {cfg.data}: no usable clip ({len(skipped['skipped'])} skipped):\n"
                          + "\n".join(f"  {p}: {r}" for p, r in skipped["skipped"].items()))

  features = {name: np.concatenate(parts) for name, parts in features.items()}
  sections = {"fvd": fvd_summary(features, cfg, fvd_note), "devices": {"devices": int(devices.mesh.size),
                                                                        "processes": jax.process_count()}}
  if not latent_stats.empty:
    sections["latent_statistics"] = latent_stats.summary()
  report = build_report(cfg, models, spec, acc, skipped, metric_names, sections)
  report["timing"] = {"total_s": time.perf_counter() - start, "first_step_s": first_step_s}
  if lead:
    written = write_outputs(out, report, acc, models, metric_names, features)
    report["pictures"] = sorted(os.path.relpath(p, out) for p in pictures_written) + written
    with open(os.path.join(out, "metrics.json"), "w") as f:
      json.dump(json_safe(report), f, indent=1, allow_nan=False)
    if out != cfg.out:
      paths_lib.copy_tree(out, cfg.out)
      shutil.rmtree(out, ignore_errors=True)
    logging.info("evaluate: %d clips, outputs in %s", acc.num_clips, cfg.out)
  return report


def fvd_status(cfg: EvalConfig, kind: str) -> str:
  """"on ..." or "off: why"."""
  if not cfg.fvd:
    return "off (--no-fvd)"
  if kind != "video" or cfg.frames < i3d.MIN_FRAMES:
    return f"off: I3D needs clips of >= {i3d.MIN_FRAMES} frames, got {cfg.frames if kind == 'video' else 'images'}"
  return "on: I3D Kinetics-400 logits of the input and of each reconstruction"


def fvd_summary(features: Mapping[str, np.ndarray], cfg: EvalConfig, status: str) -> dict[str, Any]:
  """rFVD of each reconstruction against the inputs, with its bootstrap interval and the protocol."""
  out: dict[str, Any] = {"status": status, "protocol": fvd_lib.PROTOCOL}
  if "input" not in features:
    return out
  n = len(features["input"])
  out["clips"] = n
  out["biased"] = n < fvd_lib.BIAS_CLIPS
  for name, value in features.items():
    if name == "input" or n < 2:
      continue
    entry = {"fvd": fvd_lib.fvd(features["input"], value)}
    if cfg.fvd_bootstrap:
      entry["ci95"] = fvd_lib.bootstrap_interval(features["input"], value, cfg.fvd_bootstrap)
    out[name] = entry
  return out


def gather_skipped(devices: Devices, stats: data_lib.DataStats) -> dict[str, Any]:
  """The inputs every process skipped: {"skipped": {path: reason}, "skip_events": n} (a collective)."""
  records = devices.strings([json.dumps({"skipped": stats.skipped, "events": stats.skip_events})])
  merged = [json.loads(r) for r in records]
  skipped = {p: r for m in merged for p, r in m["skipped"].items()}
  return {"skipped": dict(sorted(skipped.items())), "skip_events": int(sum(m["events"] for m in merged))}


def write_outputs(out: str, report: Mapping[str, Any], acc: Accumulator, models: Models,
                  metric_names: Sequence[str], features: Mapping[str, np.ndarray]) -> list[str]:
  """metrics.md, the plots and the per-clip I3D features (metrics.json is written by `evaluate`); returns the
  plots written."""
  os.makedirs(out, exist_ok=True)
  write_markdown(os.path.join(out, "metrics.md"), report)
  tc = models.entries[models.cv_key].model.temporal_compression if models.compat else 4
  plots.plot_per_frame(os.path.join(out, "per_frame.png"), acc, models, metric_names, tc)
  plots.plot_histograms(os.path.join(out, "per_clip_hist.png"), acc, models, metric_names)
  written = list(plots.PLOTS)
  if models.compat and plots.plot_group_offsets(os.path.join(out, "compat_group.png"), acc):
    written.append("compat_group.png")
  if features:
    np.savez(os.path.join(out, "features.npz"), paths=np.array(acc.paths),
             **{name.replace("/", "_"): value for name, value in features.items()})
  return written
