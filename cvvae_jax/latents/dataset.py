"""The latent loader for diffusion training: per-host batches of scaled latents from an encoded dataset.

    ds = cvvae_jax.latents.dataset(DIR, batch_size=64, seed=0, rng=1)    # rng: a fresh posterior sample per epoch
    for batch in ds:                                                      # batch["latents"]: [B / P, 1+k, h, w, C]
      z = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), batch["latents"])

Order and noise are pure functions of (seed, rng, position), as in the training pipeline (`data/pipeline.py`):
global batch j is positions [j B, (j + 1) B); host p of P reads the contiguous block of b = B / P of them, so its
slot k is position g = ((k // b) P + p) b + k % b, and `make_array_from_process_local_data` over a mesh whose devices
are ordered by process gives the one-host batch row for row. Position g is in epoch g // N of the N stored clips and
reads clip perm_epoch[g % N], a fresh permutation per epoch from (seed, epoch). With `rng`, the latent is a sample
mean + exp(logvar / 2) eps of the stored posterior, eps drawn from (rng, g): another sample every epoch, the same
on a rerun; without it, the mean. Either way it is scaled as the model defines, `(z - shift_factor) *
scaling_factor` (latents.json records both), which is what `inference.decode` takes; `unscale` inverts it.
`dataset(..., start_step=s)` yields exactly what a fresh loader yields from step s on.

Reads are random access (ArrayRecord, `records.py`); this module needs neither the models nor TensorFlow.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Iterator

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from cvvae_jax.latents import records

_TAG_PERMUTATION, _TAG_NOISE = 0, 1


def _rng_words(rng) -> tuple[int, ...] | None:
  """An int seed or a JAX PRNG key -> seed words for numpy (None: no sampling)."""
  if rng is None:
    return None
  if isinstance(rng, (int, np.integer)):
    return (int(rng),)
  if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  words = np.asarray(rng)
  if words.dtype != np.uint32:
    raise ValueError(f"rng: expected an int seed or a JAX PRNG key, got {type(rng).__name__} {words.dtype}")
  return tuple(int(w) for w in words.ravel())


def unscale(latents, info_or_dir) -> Any:
  """Scaled latents -> the raw posterior latents `z = latents / scaling_factor + shift_factor` (numpy or jax)."""
  info = records.read_info(info_or_dir) if isinstance(info_or_dir, (str, os.PathLike)) else info_or_dir
  return latents / info["model"]["scaling_factor"] + info["model"]["shift_factor"]


class LatentDataset:
  """An encoded dataset opened for reading: `len()` clips, `posterior(i)`, `metadata(i)`, and `batches(...)`.

  Attributes:
    info: latents.json.
    shape: per-clip latent shape `[1+k, h, w, C]`; dtype: the stored dtype.
    clips: the clip number (in the encode command's clip list) of each stored clip, in storage order.
  """

  def __init__(self, directory: str, *, cache: bool = False):
    self.directory = os.fspath(directory)
    self.info = records.read_info(self.directory)
    self.shape, self.dtype = records.latent_layout(self.info)
    self.scaling_factor = float(self.info["model"]["scaling_factor"])
    self.shift_factor = float(self.info["model"]["shift_factor"])
    count = int(self.info["clips"]["num_shards"])
    missing = [s for s in range(count) if not os.path.exists(records.manifest_path(self.directory, s, count))]
    if missing:
      raise ValueError(f"{self.directory}: {len(missing)} of {count} shards are not complete (e.g. "
                       f"{records.shard_stem(missing[0], count)}): rerun the cvvae-encode-latents command that "
                       "made it (it resumes)")
    self._paths = [records.shard_path(self.directory, s, count) for s in range(count)]
    stored = [records.read_json(records.manifest_path(self.directory, s, count))["clips"] for s in range(count)]
    sizes = [len(c) for c in stored]
    self.clips = np.asarray([c for shard in stored for c in shard], np.int64)
    self._shard = np.repeat(np.arange(count), sizes)
    self._offset = np.asarray([i for n in sizes for i in range(n)], np.int64)
    self._readers: dict[int, ArrayRecordReader] = {}
    if not len(self):
      raise ValueError(f"{self.directory}: no clip was stored (all skipped?); see latents.json")
    self.cached: np.ndarray | None = None  # [N, 2, 1+k, h, w, C]: mean and logvar of every clip, with cache=True
    if cache:
      self.cached = np.empty((len(self), 2, *self.shape), self.dtype)
      for shard in range(count):
        rows = np.flatnonzero(self._shard == shard)
        for k, record in enumerate(self._reader(shard).read(0, 2 * len(rows))):  # sequential: mean, logvar, ...
          self.cached[rows[k // 2], k % 2] = records.array(record, self.shape, self.dtype)

  def __len__(self) -> int:
    return len(self._shard)

  def _reader(self, shard: int) -> ArrayRecordReader:
    reader = self._readers.get(shard)
    if reader is None:
      reader = self._readers[shard] = ArrayRecordReader(self._paths[shard], records.READER_OPTIONS)
    return reader

  def read(self, indices, part: int = records.MEAN) -> list[bytes]:
    """The `part` records (`records.MEAN`: with the metadata; `records.LOGVAR`) of stored clips `indices` (storage
    order), one read each.

    One `read([offset])` per record, not one `read(offsets)` per shard: the list form goes through ArrayRecord's
    parallel-read machinery, which costs more than it overlaps for the few records of one host's batch (measured
    on one core: 8 records of 160 KB in 1.35-1.55 ms as one list, 8 x 0.13 ms one by one).
    """
    shards, offsets = self._shard, 2 * self._offset + part
    return [self._reader(int(shards[i])).read([int(offsets[i])])[0] for i in np.asarray(indices, np.int64)]

  def views(self, indices, part: int = records.MEAN) -> list[np.ndarray]:
    """The means (or log-variances) of stored clips `indices` as read-only views, unscaled, `[1+k, h, w, C]` each:
    of the records read (one copy: the read) or of the in-memory copy (no copy) with cache=True."""
    if self.cached is not None:
      return [self.cached[i, part] for i in np.asarray(indices, np.int64)]
    return [records.array(record, self.shape, self.dtype) for record in self.read(indices, part)]

  def posterior(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, logvar) of stored clip `index`, unscaled, `[1+k, h, w, C]` (copies)."""
    return self.views([index], records.MEAN)[0].copy(), self.views([index], records.LOGVAR)[0].copy()

  def posteriors(self, indices) -> np.ndarray:
    """`[len(indices), 2, 1+k, h, w, C]`: mean and logvar of stored clips `indices` (from memory with cache=True)."""
    if self.cached is not None:
      return self.cached[np.asarray(indices, np.int64)]
    return np.stack([np.stack(pair) for pair in zip(self.views(indices, records.MEAN),
                                                     self.views(indices, records.LOGVAR))])

  def metadata(self, index: int) -> dict[str, Any]:
    """{"clip", "video", "path", "frames", "fps"} of stored clip `index`."""
    return records.metadata(self.read([index])[0])

  def batches(self, batch_size: int, *, seed: int = 0, rng=None, shuffle: bool = True, start_step: int = 0,
              num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
              with_logvar: bool = False) -> LatentIterator:
    """See `dataset`."""
    return LatentIterator(self, batch_size, seed=seed, rng=rng, shuffle=shuffle, start_step=start_step,
                          num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                          with_logvar=with_logvar)


class LatentIterator:
  """Yields `{"latents": float32 [b, 1+k, h, w, C] scaled, "clip": int64 [b], "index": int64 [b]}` per step
  (b = batch_size / process_count; "index" is the stored position, for `LatentDataset.metadata`)."""

  def __init__(self, data: LatentDataset, batch_size: int, *, seed: int, rng, shuffle: bool, start_step: int,
               num_epochs: int | None, process_index: int | None, process_count: int | None,
               with_logvar: bool = False):
    self._with_logvar = bool(with_logvar)
    p = jax.process_index() if process_index is None else int(process_index)
    n_p = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n_p:
      raise ValueError(f"expected 0 <= process_index < process_count, got {p}, {n_p}")
    if batch_size < 1 or batch_size % n_p:
      raise ValueError(f"batch_size: expected a positive multiple of process_count={n_p} (it is the global batch), "
                       f"got {batch_size}")
    if start_step < 0:
      raise ValueError(f"start_step: expected >= 0, got {start_step}")
    self.data, self.step = data, int(start_step)
    self._seed, self._noise, self._shuffle = int(seed), _rng_words(rng), bool(shuffle)
    self._p, self._P, self._b, self._B = p, n_p, batch_size // n_p, int(batch_size)
    self._end = None if num_epochs is None else (int(num_epochs) * len(data)) // self._B  # steps
    self._perm: tuple[int, np.ndarray] | None = None
    self._size = int(np.prod(data.shape))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm is None or self._perm[0] != epoch:
      n = len(self.data)
      perm = (np.random.default_rng([self._seed, _TAG_PERMUTATION, epoch]).permutation(n) if self._shuffle
              else np.arange(n))
      self._perm = (epoch, perm)
    return self._perm[1]

  def positions(self, step: int) -> np.ndarray:
    """The global positions this host reads at `step`."""
    return (step * self._P + self._p) * self._b + np.arange(self._b)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._end is not None and self.step >= self._end:
      raise StopIteration
    n = len(self.data)
    positions = self.positions(self.step)
    epochs, offsets = np.divmod(positions, n)
    index = np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)
    cached = self.data.cached
    if cached is not None and self._noise is None and not self._with_logvar:
      z = np.asarray(cached[index, 0], np.float32)  # a fancy-index copy of the means only
    else:
      # One pass per clip from the record (or cache) into the batch: the mean (cast to float32), then the noise.
      z = np.empty((len(index), *self.data.shape), np.float32)
      for row, mean in enumerate(self.data.views(index, records.MEAN)):
        z[row] = mean
      if self._noise is not None or self._with_logvar:
        logvars = np.empty_like(z) if self._with_logvar else None  # (sampling alone needs no copy)
        for row, logvar in enumerate(self.data.views(index, records.LOGVAR)):
          if logvars is not None:
            logvars[row] = logvar
          if self._noise is not None:
            eps = np.random.default_rng([*self._noise, _TAG_NOISE, int(positions[row])]).standard_normal(
                self.data.shape, np.float32)
            z[row] += np.exp(np.float32(0.5) * logvar) * eps
    if self.data.shift_factor:  # x - 0 is x: skipping it changes no bit
      np.subtract(z, np.float32(self.data.shift_factor), out=z)
    np.multiply(z, np.float32(self.data.scaling_factor), out=z)
    self.step += 1
    out = {"latents": z, "clip": self.data.clips[index], "index": index}
    if self._with_logvar:
      out["logvar"] = logvars
    return out

  def state(self) -> dict[str, int]:
    """What a checkpoint needs to resume: `dataset(..., start_step=state["step"])`."""
    return {"step": self.step}


def dataset(directory: str, batch_size: int, *, seed: int = 0, rng=None, shuffle: bool = True, start_step: int = 0,
            num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
            cache: bool = False, with_logvar: bool = False) -> LatentIterator:
  """Per-host batches of scaled latents from a folder written by `cvvae-encode-latents` (see the module docstring).

  Args:
    directory: the `--out` of the encode command.
    batch_size: the global batch; each host gets batch_size // process_count rows.
    seed: the shuffle seed (the same on every host).
    rng: an int or a JAX PRNG key: latents sampled from the stored posterior; None: the posterior mean.
    shuffle: a fresh permutation every epoch; False: storage order.
    start_step: the first step to yield (resume).
    num_epochs: stop after this many passes (the last partial global batch dropped); None: forever.
    process_index, process_count: this host and the number of hosts (default: from jax).
    cache: read every record into memory once (sequentially) and batch from there: for datasets that fit in this
      host's memory (N x 2 x the latent's bytes); the batches are the same.
    with_logvar: also yield the posterior's log-variance, "logvar" float32 [b, 1+k, h, w, C] (unscaled), to draw
      samples on the devices, `latents + scaling_factor * exp(logvar / 2) * jax.random.normal(...)` (with
      rng=None), where host-side noise would be the loader's bottleneck.
  Returns:
    An iterator of `{"latents": float32 [b, 1+k, h, w, C], "clip": int64 [b], "index": int64 [b]}`; `.step`,
    `.state()`; `.data` is the `LatentDataset` (latents.json as `.data.info`).
  """
  return LatentDataset(directory, cache=cache).batches(batch_size, seed=seed, rng=rng, shuffle=shuffle,
                                                       start_step=start_step, num_epochs=num_epochs,
                                                       process_index=process_index, process_count=process_count,
                                                       with_logvar=with_logvar)
