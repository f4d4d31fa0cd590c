"""Mixing the streams of the training input: which stream serves each step, a pure function of (seed, step).

All hosts must agree on each step's stream (batch shapes must match across processes), so the schedule depends on
nothing but the seed, the stream weights, the mode and the step.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import numpy as np

_TAG_MIXING = 2  # the seed tag of the mixing draws (pipeline.py uses 0, 1 and 3 for its own)
_MIXING_BLOCK = 4096


class Mixing(enum.Enum):
  ALTERNATE = "alternate"  # deterministic interleaving in proportion to the weights (v, i, v, i, ...)
  WEIGHTED = "weighted"    # each step's stream drawn at random with the weights



class MixingSchedule:
  """Which stream serves each step; a pure function of (seed, weights, mode, step)."""

  def __init__(self, weights: list[float], mode: Mixing, seed: int):
    self.weights = np.asarray(weights, np.float64)
    self.mode = mode
    self.seed = int(seed)
    self._cumulative = np.cumsum(self.weights / self.weights.sum())

  def _block(self, block: int) -> np.ndarray:
    draws = np.random.default_rng([self.seed, _TAG_MIXING, block]).random(_MIXING_BLOCK)
    return np.minimum(np.searchsorted(self._cumulative, draws, side="right"), len(self.weights) - 1)

  def iterate(self, start_step: int = 0) -> Iterator[int]:
    """Stream ids for steps start_step, start_step + 1, ..."""
    if self.mode is Mixing.WEIGHTED:
      block, offset = divmod(start_step, _MIXING_BLOCK)
      while True:
        yield from (int(j) for j in self._block(block)[offset:])
        block, offset = block + 1, 0
    # Smooth weighted round robin: deterministic, proportional, maximally interleaved.
    credit = np.zeros_like(self.weights)
    total = self.weights.sum()
    step = 0
    while True:
      credit += self.weights
      j = int(np.argmax(credit))
      credit[j] -= total
      if step >= start_step:
        yield j
      step += 1

  def counts_before(self, step: int) -> np.ndarray:
    """How many batches each stream served in steps [0, step)."""
    counts = np.zeros(len(self.weights), np.int64)
    if self.mode is Mixing.WEIGHTED:
      full, rest = divmod(step, _MIXING_BLOCK)
      for block in range(full):
        counts += np.bincount(self._block(block), minlength=len(counts))
      counts += np.bincount(self._block(full)[:rest], minlength=len(counts))
      return counts
    it = self.iterate(0)
    for _ in range(step):
      counts[next(it)] += 1
    return counts
