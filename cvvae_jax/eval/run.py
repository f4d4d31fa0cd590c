"""The evaluation run: `evaluate(cfg)` checks everything, then scores every batch and writes every output."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from cvvae_jax import data as data_lib
from cvvae_jax.eval import plots
from cvvae_jax.eval.accumulator import Accumulator
from cvvae_jax.eval.config import METRICS, EvalConfig, EvaluationError
from cvvae_jax.eval.data import check_setup, data_config, resolve_data
from cvvae_jax.eval.models import Models, load_models
from cvvae_jax.eval.report import build_report, json_safe, write_markdown
from cvvae_jax.eval.step import make_step
from cvvae_jax.models import lpips


class _Progress:
  """A tqdm bar (with ETA) over batches, or nothing."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      self._bar = tqdm(total=total, unit="batch", desc="evaluate", file=sys.stderr, dynamic_ncols=True)

  def update(self, clips: int, postfix: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(postfix, refresh=False)
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
  """Runs the whole evaluation and writes every output into `cfg.out`; returns the metrics.json content.

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

  dcfg = data_config(cfg, spec)
  stats = data_lib.DataStats()
  try:
    eval_data = data_lib.create_eval_iterator(dcfg, process_index=0, process_count=1, stats=stats)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f"--data {cfg.data}: {e}") from e
  lpips_params = lpips.load_lpips_params() if cfg.lpips else None
  step = make_step(models, cfg)
  params = {k: e.params for k, e in models.entries.items()}
  metric_names = [m for m in METRICS if m != "lpips" or cfg.lpips]

  os.makedirs(cfg.out, exist_ok=True)
  samples_dir = os.path.join(cfg.out, "samples")
  acc = Accumulator()
  pictures_written: list[str] = []
  num_batches = len(eval_data)
  if cfg.max_clips:
    num_batches = min(num_batches, math.ceil(cfg.max_clips / cfg.batch_size))
  progress = _Progress(num_batches, cfg.progress)
  first_step_s = None
  batches = iter(eval_data)
  try:
    for batch in batches:
      if cfg.max_clips and acc.num_clips >= cfg.max_clips:
        break
      mask = np.asarray(batch["mask"], bool)
      if not mask.any():
        progress.update(0, "skipped batch")
        continue
      t0 = time.perf_counter()
      scores, pictures = jax.device_get(step(params, lpips_params, batch["video"]))
      if first_step_s is None:
        first_step_s = time.perf_counter() - t0
      before = acc.num_clips
      added = acc.add(scores, batch["path"], mask, limit=cfg.max_clips)
      for j, row in enumerate(np.flatnonzero(mask)[:added]):
        if before + j < cfg.num_samples:
          pictures_written += plots.write_samples(samples_dir, before + j, batch["video"][row],
                                            {k: v[row] for k, v in pictures.items()}, models, cfg)
      psnr_now = np.mean(acc.clip_values("recon/model", "psnr"))
      progress.update(int(mask.sum()), f"clips={acc.num_clips} psnr={psnr_now:.2f}")
  finally:
    progress.close()
    close = getattr(batches, "close", None)
    if close:
      close()
  if acc.num_clips == 0:
    raise EvaluationError(f"--data {cfg.data}: no usable clip ({stats.num_skipped} skipped):\n{stats.report()}")

  report = build_report(cfg, models, spec, acc, stats, metric_names)
  report["timing"] = {"total_s": time.perf_counter() - start, "first_step_s": first_step_s}
  write_outputs(cfg.out, report, acc, models, metric_names)
  report["pictures"] = sorted(os.path.relpath(p, cfg.out) for p in pictures_written) + [
      "per_frame.png", "per_clip_hist.png"]
  with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
    json.dump(json_safe(report), f, indent=1, allow_nan=False)
  logging.info("evaluate: %d clips, outputs in %s", acc.num_clips, cfg.out)
  return report


def write_outputs(out: str, report: Mapping[str, Any], acc: Accumulator, models: Models,
                  metric_names: Sequence[str]) -> None:
  """metrics.md and the plots (metrics.json is written by `evaluate`)."""
  write_markdown(os.path.join(out, "metrics.md"), report)
  tc = models.entries[models.cv_key].model.temporal_compression if models.compat else 4
  plots.plot_per_frame(os.path.join(out, "per_frame.png"), acc, models, metric_names, tc)
  plots.plot_histograms(os.path.join(out, "per_clip_hist.png"), acc, models, metric_names)
