"""Aggregation of an evaluation: per-frame scores of every series, clip by clip, summarised over the set."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cvvae_jax import metrics


class Accumulator:
  """Collects per-frame scores of every series, clip by clip, and summarises them.

  `add(scores, paths, mask)` takes one batch: `scores[series][metric]` `[B, T_series]`; rows where `mask` is False
  (padding, skipped inputs) are dropped. Each clip counts once (its mean over frames) in the set's mean and 95% CI.
  """

  def __init__(self):
    self.paths: list[str] = []
    self.values: dict[str, dict[str, list[np.ndarray]]] = {}

  @property
  def num_clips(self) -> int:
    return len(self.paths)

  def add(self, scores: Mapping[str, Mapping[str, Any]], paths: Sequence[str], mask: Sequence[bool],
          limit: int = 0) -> int:
    """Adds the masked rows of a batch (at most up to `limit` clips in all when `limit` > 0); returns rows added."""
    rows = [i for i, m in enumerate(np.asarray(mask, bool)) if m]
    if limit:
      rows = rows[:max(0, limit - self.num_clips)]
    for series, per_metric in scores.items():
      for metric, value in per_metric.items():
        value = np.asarray(value, np.float64)
        if value.ndim != 2 or value.shape[0] != len(mask):
          raise ValueError(f"expected {series}/{metric} scores [B={len(mask)}, T], got shape {value.shape}")
        self.values.setdefault(series, {}).setdefault(metric, []).extend(value[i] for i in rows)
    self.paths.extend(str(paths[i]) for i in rows)
    return len(rows)

  def per_frame(self, series: str, metric: str) -> np.ndarray:
    """`[N, T]` per-frame values of one series."""
    return np.stack(self.values[series][metric])

  def clip_values(self, series: str, metric: str) -> np.ndarray:
    """`[N]` per-clip means over frames."""
    return metrics.clip_means(self.per_frame(series, metric))

  def summary(self, series: str, metric: str, frames: Optional[slice] = None) -> dict[str, Any]:
    """{"mean", "ci95", "n"} over clips, and per-frame means and CIs over clips; `frames` restricts the frames."""
    per_frame = self.per_frame(series, metric)
    if frames is not None:
      per_frame = per_frame[:, frames]
    s = metrics.summarize(metrics.clip_means(per_frame))
    n = per_frame.shape[0]
    frame_ci = (metrics.Z_95 * per_frame.std(axis=0, ddof=1) / math.sqrt(n) if n > 1
                else np.full(per_frame.shape[1], np.nan))
    return {"mean": s.mean, "ci95": s.ci95, "n": s.n, "per_frame_mean": per_frame.mean(axis=0).tolist(),
            "per_frame_ci95": frame_ci.tolist()}

  def paired_difference(self, a: str, b: str, metric: str) -> dict[str, Any]:
    """Mean and 95% CI over clips of (a - b), each clip's means paired."""
    s = metrics.summarize(self.clip_values(a, metric) - self.clip_values(b, metric))
    return {"mean": s.mean, "ci95": s.ci95, "n": s.n}
