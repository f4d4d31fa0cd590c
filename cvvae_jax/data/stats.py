"""What the input pipeline skipped, counted and delivered. Thread-safe: decoders run in tf.data threads."""

from __future__ import annotations

import collections
import threading
import time

from absl import logging


class DataStats:
  """Counters shared by every stream of one iterator.

  Attributes:
    skipped: path (or dataset key) -> reason, for every input skipped; each path is logged once.
    skip_events: how many times an input was skipped (a bad file met twice counts twice).
    counters: named counts, e.g. "stride_fallback" (videos too short for the stride range) and
      per stream "<name>/examples", "<name>/batches".
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.skipped: dict[str, str] = {}
    self.skip_events = 0
    self.counters: collections.Counter[str] = collections.Counter()
    self._first_batch_time: float | None = None
    self._last_batch_time: float | None = None

  def skip(self, path: str, reason: str) -> None:
    """Records a skipped input; the first time a path is skipped it is logged with its reason."""
    with self._lock:
      self.skip_events += 1
      first = path not in self.skipped
      if first:
        self.skipped[path] = reason
    if first:
      logging.warning("data: skipping %s: %s", path, reason)

  def count(self, name: str, n: int = 1) -> None:
    with self._lock:
      self.counters[name] += n

  def record_batch(self, stream: str, examples: int, frames: int) -> None:
    """Called by the iterator for every batch handed to the caller (throughput bookkeeping)."""
    now = time.perf_counter()
    with self._lock:
      if self._first_batch_time is None:
        self._first_batch_time = now
      else:
        # Time is counted from the first batch, so the first batch's examples are not counted.
        self.counters[f"{stream}/examples"] += examples
        self.counters[f"{stream}/frames"] += frames
        self.counters["examples"] += examples
      self.counters[f"{stream}/batches"] += 1
      self._last_batch_time = now

  @property
  def num_skipped(self) -> int:
    """Distinct inputs skipped."""
    return len(self.skipped)

  def throughput(self) -> dict[str, float]:
    """Examples (clips or images) per second handed to the caller, overall and per stream."""
    with self._lock:
      if self._first_batch_time is None or self._last_batch_time == self._first_batch_time:
        return {}
      elapsed = self._last_batch_time - self._first_batch_time
      out = {"examples_per_s": self.counters["examples"] / elapsed}
      for key, value in self.counters.items():
        if key.endswith("/examples") or key.endswith("/frames"):
          out[key + "_per_s"] = value / elapsed
      return out

  def summary(self) -> dict[str, float]:
    """Scalars for a metric writer: throughput, skipped inputs, fallbacks."""
    out = {f"data/{k}": v for k, v in self.throughput().items()}
    with self._lock:
      out["data/skipped_inputs"] = float(len(self.skipped))
      out["data/skip_events"] = float(self.skip_events)
      out["data/stride_fallback"] = float(self.counters["stride_fallback"])
    return out

  def report(self) -> str:
    """A human-readable summary listing every skipped input with its reason."""
    with self._lock:
      lines = [f"{len(self.skipped)} input(s) skipped ({self.skip_events} skip events), "
               f"{self.counters['stride_fallback']} stride fallback(s)"]
      lines += [f"  {path}: {reason}" for path, reason in sorted(self.skipped.items())]
    return "\n".join(lines)
