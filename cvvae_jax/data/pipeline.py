"""Training and evaluation iterators: tf.data pipelines over random-access sources.

Order and randomness are pure functions of (seed, position), never of history:

* Each stream is an infinite sequence of global positions; global batch j is positions
  [j * B, (j + 1) * B). Host p of P reads the contiguous block of b = B / P of them that it feeds
  to its devices: its slot k (batch k // b, row k % b) is position g = ((k // b) * P + p) * b + k % b.
  So a P-host job's global batch is, row for row, the 1-host batch (the per-row posterior noise meets
  the same example whatever the process count). Position g lies in epoch g // N of the stream's N
  examples and picks example perm_epoch[g % N] (a fresh permutation per epoch from (seed, stream,
  epoch)): hosts read disjoint examples within an epoch, and together every example once per epoch.
* The clip drawn from that example (stride, start, resize, crop) uses a generator seeded with
  (seed, stream, g), so it is the same from a folder and from its TFDS copy.
* If an example is unusable (bad file, too short), the slot deterministically tries the next
  example of the permutation; the file is counted and reported once (`DataStats`).
* Which stream serves step s is a function of (seed, s), identical on every host (all hosts must
  agree on batch shapes). Pass the same `seed` on every host.

Hence an iterator created with `start_step=s` yields exactly the batches a fresh one yields from
step s on: the position is derived from the step, and the checkpoint needs only the step.
Decoding runs in Python (PyAV, Pillow) inside `tf.numpy_function`, parallelised by tf.data's
`map(num_parallel_calls=...)`; both libraries release the GIL while decoding.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import threading
import weakref
import zlib
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from cvvae_jax.data import media, sources
from cvvae_jax.data.mixing import Mixing, MixingSchedule
from cvvae_jax.data.sampling import ClipSpec, sample_example
from cvvae_jax.data.stats import DataStats

_TAG_PERMUTATION, _TAG_EXAMPLE, _TAG_EVAL = 0, 1, 3  # seed tags of the random streams (2: mixing.py)


def _name_id(name: str) -> int:
  return zlib.crc32(name.encode())


def _reason(error: Exception) -> str:
  """Why an input was skipped: BadInput says it; anything else is named with its type."""
  if isinstance(error, media.BadInput):
    return error.reason
  return f"unreadable ({type(error).__name__}: {error})"


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"expected 0 <= process_index < process_count, got {process_index}, {process_count}")
  return int(process_index), int(process_count)


# ----------------------------------------------------------------------------------------------------
# Config parsing.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """One stream of the mix, parsed from `config.streams.<name>`."""
  name: str
  clip: ClipSpec
  weight: float
  batch_size: int  # global: every host gets batch_size // process_count
  source: dict[str, Any]

  def host_batch_size(self, process_count: int) -> int:
    if self.batch_size % process_count:
      raise ValueError(f"streams.{self.name}.batch_size: expected a multiple of process_count="
                       f"{process_count} (it is the global batch size), got {self.batch_size}")
    return self.batch_size // process_count


def _source_kwargs(cfg, embedded_dir: str) -> dict[str, Any]:
  return dict(kind=cfg.kind, source=cfg.source, path=cfg.path, tfds_name=cfg.tfds_name,
              split=cfg.split, data_dir=cfg.data_dir, data_key=cfg.data_key, embedded_dir=embedded_dir)


def parse_streams(config) -> list[StreamSpec]:
  """Checks `config.streams` and returns one spec per stream, sorted by name."""
  if not config.streams:
    raise ValueError("config.streams: expected at least one stream, got none")
  specs = []
  for name in sorted(config.streams):
    cfg = config.streams[name]
    where = f"streams.{name}"
    clip = ClipSpec.create(kind=cfg.kind, frames=cfg.frames, stride=cfg.stride, size=cfg.size,
                           short_side=cfg.short_side, crop=cfg.crop, start="random",
                           stride_fallback=True, where=where)
    if not cfg.weight > 0:
      raise ValueError(f"{where}.weight: expected > 0, got {cfg.weight}")
    if not cfg.batch_size >= 1:
      raise ValueError(f"{where}.batch_size: expected >= 1, got {cfg.batch_size}")
    specs.append(StreamSpec(name=name, clip=clip, weight=float(cfg.weight), batch_size=int(cfg.batch_size),
                            source=_source_kwargs(cfg, config.embedded_dir)))
  return specs


# ----------------------------------------------------------------------------------------------------
# One stream.
# ----------------------------------------------------------------------------------------------------

class ExampleLoader:
  """Maps a host's example slot to a uint8 clip `[T, H, W, 3]` (see the module docstring)."""

  def __init__(self, source: sources.Source, spec: StreamSpec, *, seed: int, shuffle: bool,
               process_index: int, process_count: int, stats: DataStats, max_attempts: int,
               decode_threads: int):
    if len(source) < process_count:
      raise ValueError(f"streams.{spec.name}: {source.name} has {len(source)} examples, fewer than "
                       f"process_count={process_count}; every host needs its own examples")
    self.source, self.spec, self.stats = source, spec, stats
    self._seed, self._id = int(seed), _name_id(spec.name)
    self._shuffle = shuffle
    self._p, self._P = process_index, process_count
    self._b = spec.host_batch_size(process_count)
    self._max_attempts = max(1, min(int(max_attempts), len(source)))
    self._decode_threads = decode_threads
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._permutations.get(epoch)
    if perm is None:
      n = len(self.source)
      perm = (np.random.default_rng([self._seed, self._id, _TAG_PERMUTATION, epoch]).permutation(n)
              if self._shuffle else np.arange(n))
      with self._lock:
        self._permutations[epoch] = perm
        for old in [e for e in self._permutations if e < epoch - 1]:
          del self._permutations[old]
    return perm

  def position(self, slot: int) -> int:
    """Global position of this host's slot: row `slot % b` of its block in global batch `slot // b`."""
    batch, row = divmod(int(slot), self._b)
    return (batch * self._P + self._p) * self._b + row

  def index(self, slot: int, attempt: int = 0) -> int:
    """Example index read for a slot (attempt > 0: the replacements for unusable examples)."""
    epoch, offset = divmod(self.position(slot), len(self.source))
    return int(self._permutation(epoch)[(offset + attempt) % len(self.source)])

  def __call__(self, slot) -> np.ndarray:
    slot = int(slot)
    position = self.position(slot)
    for attempt in range(self._max_attempts):
      index = self.index(slot, attempt)
      rng = np.random.default_rng([self._seed, self._id, _TAG_EXAMPLE, position, attempt])
      record = None
      try:
        record = self.source[index]
        return sample_example(record, self.spec.clip, rng, stats=self.stats,
                              decode_threads=self._decode_threads)
      except Exception as e:  # pylint: disable=broad-except  (a bad input must never stop training)
        where = self.source.locate(record["key"]) if record else self.source.describe(index)
        self.stats.skip(where, _reason(e))
    raise RuntimeError(f"streams.{self.spec.name}: {self._max_attempts} examples in a row were "
                       f"unusable in {self.source.name}; see the skipped-input log")


# tf.data threads still calling into Python (numpy_function) while the interpreter shuts down
# deadlock the exit; so every live tf.data iterator is released before that, at exit.
_LIVE_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _release_live_iterators() -> None:
  for live in list(_LIVE_ITERATORS):
    live.close()
  gc.collect()


def _to_unit_range(video: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return tf.cast(video, tf.float32) / 127.5 - 1.0


def stream_dataset(loader: ExampleLoader, *, first_slot: int, batch_size: int, num_parallel_calls: int,
                   prefetch: int) -> tf.data.Dataset:
  """Infinite dataset of float32 batches `[batch_size, T, H, W, 3]` starting at `first_slot`."""
  clip = loader.spec.clip
  shape = (clip.frames, *clip.size, 3)

  def load(slot):
    video = tf.numpy_function(loader, [slot], tf.uint8, stateful=True)
    return tf.ensure_shape(video, shape)

  ds = tf.data.Dataset.counter(start=first_slot, dtype=tf.int64)
  ds = ds.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(_to_unit_range, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# ----------------------------------------------------------------------------------------------------
# Training iterator.
# ----------------------------------------------------------------------------------------------------

class TrainIterator:
  """Yields `{"video": float32 [B, T, H, W, 3] in [-1, 1], "stream": name}`, one batch per step.

  Attributes:
    step: the step of the next batch.
    stats: DataStats (skipped inputs, fallbacks, throughput).
    batch_shapes: {stream name: (B, T, H, W, 3)} per host; each stream keeps one static shape.
  """

  def __init__(self, specs: list[StreamSpec], datasets: list[tf.data.Dataset], schedule: MixingSchedule,
               *, start_step: int, stats: DataStats, log_every_steps: int, process_count: int):
    self._specs = specs
    self._iterators = [ds.as_numpy_iterator() for ds in datasets]
    self._schedule = schedule.iterate(start_step)
    self._log_every = log_every_steps
    self.step = start_step
    self.stats = stats
    self.batch_shapes = {s.name: (s.host_batch_size(process_count), s.clip.frames, *s.clip.size, 3)
                         for s in specs}
    _LIVE_ITERATORS.add(self)

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    if self._iterators is None:
      raise StopIteration
    j = next(self._schedule)
    spec = self._specs[j]
    video = next(self._iterators[j])
    self.step += 1
    self.stats.record_batch(spec.name, video.shape[0], video.shape[0] * video.shape[1])
    if self._log_every and self.step % self._log_every == 0:
      self.log()
    return {"video": video, "stream": spec.name}

  def log(self) -> None:
    rates = self.stats.throughput()
    per_stream = ", ".join(f"{s.name} {rates.get(s.name + '/examples_per_s', 0.0):.1f}/s"
                           for s in self._specs)
    logging.info("data: step %d, %.1f examples/s (%s), %d input(s) skipped, %d stride fallback(s)",
                 self.step, rates.get("examples_per_s", 0.0), per_stream, self.stats.num_skipped,
                 self.stats.counters["stride_fallback"])

  def close(self) -> None:
    """Stops the decoding threads (also done automatically at interpreter exit)."""
    self._iterators = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def state(self) -> dict[str, int]:
    """All that a checkpoint needs to resume: `create_train_iterator(..., start_step=state["step"])`."""
    return {"step": self.step}


def create_train_iterator(config, *, seed: int, process_index: int | None = None,
                          process_count: int | None = None, start_step: int = 0,
                          stats: DataStats | None = None) -> TrainIterator:
  """The training input: a deterministic, resumable, per-host mix of video and image batches.

  Args:
    config: the data config (`data/config.py`).
    seed: data seed; the same on every host (hosts differ by `process_index`).
    process_index, process_count: this host and the number of hosts (default: from jax).
    start_step: first step to yield; the batches equal those a fresh iterator yields from it on.
    stats: a DataStats to fill (default: a new one, available as `iterator.stats`).
  Returns:
    TrainIterator of `{"video": float32 [B, T, H, W, 3] in [-1, 1], "stream": str}`; images are
    T = 1 batches with their own B, H, W. B is the stream's batch_size // process_count.
  """
  if start_step < 0:
    raise ValueError(f"expected start_step >= 0, got {start_step}")
  process_index, process_count = _process(process_index, process_count)
  stats = stats if stats is not None else DataStats()
  specs = parse_streams(config)
  mixing = Mixing(config.mixing) if config.mixing in [m.value for m in Mixing] else None
  if mixing is None:
    raise ValueError(f"config.mixing: expected 'alternate' or 'weighted', got {config.mixing!r}")
  schedule = MixingSchedule([s.weight for s in specs], mixing, seed)
  counts = schedule.counts_before(start_step)
  datasets = []
  for spec, count in zip(specs, counts):
    host_batch = spec.host_batch_size(process_count)
    source = sources.open_source(**spec.source, stats=stats, workers=config.probe_workers,
                                 index_dir=config.get("index_dir", ""), process_index=process_index,
                                 process_count=process_count, where=f"streams.{spec.name}")
    loader = ExampleLoader(source, spec, seed=seed, shuffle=config.shuffle, process_index=process_index,
                           process_count=process_count, stats=stats, max_attempts=config.max_attempts,
                           decode_threads=config.decode_threads)
    logging.info("data: stream %s: %d examples from %s, host batch %s, starting at slot %d",
                 spec.name, len(source), source.name, (host_batch, spec.clip.frames, *spec.clip.size, 3),
                 int(count) * host_batch)
    datasets.append(stream_dataset(loader, first_slot=int(count) * host_batch, batch_size=host_batch,
                                   num_parallel_calls=config.num_parallel_calls, prefetch=config.prefetch))
  return TrainIterator(specs, datasets, schedule, start_step=start_step, stats=stats,
                       log_every_steps=config.log_every_steps, process_count=process_count)


# ----------------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------------

class EvalData:
  """Iterable over one pass of an evaluation set, the same number of batches on every host.

  Each pass yields `{"video": float32 [B, T, H, W, 3] in [-1, 1], "path": str [B], "mask": bool [B],
  "index": int64 [B]}`; `mask` is False for padding (the last batches) and for skipped inputs, whose video is
  zeros; `index` is the example's position in the dataset (-1 for padding), the same for any process count.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int, stats: DataStats):
    self._dataset = dataset
    self.num_batches = num_batches
    self.stats = stats

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> "_EvalPass":
    return _EvalPass(self._dataset)


class _EvalPass:
  """One pass over an EvalData; `close()` (or exit) stops its decoding threads."""

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = dataset.as_numpy_iterator()
    _LIVE_ITERATORS.add(self)

  def __iter__(self) -> "_EvalPass":
    return self

  def __next__(self) -> dict[str, Any]:
    if self._iterator is None:
      raise StopIteration
    try:
      video, path, mask, index = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    return {"video": video, "path": np.array([p.decode() for p in path]), "mask": mask, "index": index}

  def close(self) -> None:
    self._iterator = None


def create_eval_iterator(config, *, process_index: int | None = None, process_count: int | None = None,
                         stats: DataStats | None = None) -> EvalData:
  """Centre-cropped evaluation clips with their source paths, from `config.eval`.

  The clip is the first `frames` frames at `stride` (no stride fallback: a video too short is
  skipped and counted), after a resize of the short side to `short_side`, centre-cropped to `size`.
  Every host reads examples index = k * process_count + process_index, in order.

  Args:
    config: the data config; `config.eval` holds kind, source, path/tfds_name/split/data_dir,
      frames, stride, size, short_side, batch_size (per host).
    process_index, process_count: default from jax.
    stats: a DataStats to fill (default: new, as `.stats`).
  Returns:
    EvalData (see its docstring); `len()` is the number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  stats = stats if stats is not None else DataStats()
  ec = config.eval
  clip = ClipSpec.create(kind=ec.kind, frames=ec.frames, stride=ec.stride, size=ec.size,
                         short_side=ec.short_side, crop="center", start="first", stride_fallback=False,
                         where="eval")
  source = sources.open_source(**_source_kwargs(ec, config.embedded_dir), stats=stats,
                               workers=config.probe_workers, index_dir=config.get("index_dir", ""),
                               process_index=process_index, process_count=process_count, where="eval")
  n = len(source)
  per_host = math.ceil(n / process_count)
  batch = int(ec.batch_size)
  num_batches = math.ceil(per_host / batch)
  shape = (clip.frames, *clip.size, 3)

  def load(slot):
    index = int(slot) * process_count + process_index
    if index >= n:
      return np.zeros(shape, np.uint8), b"", False, np.int64(-1)
    record = None
    try:
      record = source[index]
      rng = np.random.default_rng([_TAG_EVAL, index])  # only the short side, if given as a range
      video = sample_example(record, clip, rng, stats=stats)
      return video, source.locate(record["key"]).encode(), True, np.int64(index)
    except Exception as e:  # pylint: disable=broad-except
      where = source.locate(record["key"]) if record else source.describe(index)
      stats.skip(where, _reason(e))
      return np.zeros(shape, np.uint8), where.encode(), False, np.int64(index)

  def load_tf(slot):
    video, path, ok, index = tf.numpy_function(load, [slot], (tf.uint8, tf.string, tf.bool, tf.int64),
                                               stateful=True)
    return (tf.ensure_shape(video, shape), tf.ensure_shape(path, ()), tf.ensure_shape(ok, ()),
            tf.ensure_shape(index, ()))

  ds = tf.data.Dataset.range(num_batches * batch)
  ds = ds.map(load_tf, num_parallel_calls=config.num_parallel_calls, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.map(lambda v, p, m, i: (_to_unit_range(v), p, m, i))
  ds = ds.prefetch(config.prefetch)
  logging.info("data: eval: %d examples from %s, %d batches of %s per host", n, source.name,
               num_batches, (batch, *shape))
  return EvalData(ds, num_batches, stats)
