r"""Encode a video (or image) dataset to latents once, for diffusion training: `cvvae-encode-latents`.

    cvvae-encode-latents --model PATH --data FOLDER|TFDS_NAME|embedded[:image] --out DIR [--data_kind auto] \
        [--frames 17] [--stride 1] [--resolution 256] [--clips_per_video 1] [--tiling tiled] [--dtype float32] \
        [--batch_size 8] [--clips_per_shard 256]              (or: python -m cvvae_jax.encode_latents ...)

Stores per clip the posterior's mean and log-variance (unscaled, float32; a diffusion run draws a fresh sample each
epoch) with the source path, frame numbers and fps, in ArrayRecord shards with a `latents.json` (`records.py` has
the layout and why ArrayRecord). Read them back with `cvvae_jax.latents.dataset`.

Clips are those of the evaluation's sampling (`clips.py`), encoded with `inference.encode_posterior` (chunked in
time and tiled in space per `--tiling`; in "original" mode with the model's own sizes unless given), images as
one-frame clips, `--batch_size` clips per step in each process, split over its devices.
Several processes (the same command on every host, as for training) each encode their own shards (shard s goes
to process s % processes) with their local devices; they meet only at the end, when process 0 writes the summary.

Resumable and exact: the clip list and the clips of each shard are fixed by the data and the flags; a shard is
written under a temporary name and renamed when complete, and a rerun of the same command skips complete shards and
re-encodes the others to the same bytes. A rerun with other settings (model, data, clip flags, tiling, dtype,
batch size, shard size) is an error naming the differences. Bad or too-short videos are skipped and listed in
`latents.json`. Exactness across process or device counts needs the same clips per device in each step
(`batch_size / devices`), as XLA may round a batch of 2 differently from two batches of 1.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import math
import os
import sys
import time
from typing import Any
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cvvae_jax import cli, distributed, utils
from cvvae_jax.data import media, sources
from cvvae_jax.data.stats import DataStats
from cvvae_jax.inference import api, plan
from cvvae_jax.latents import records
from cvvae_jax.latents.clips import EMBEDDED_DIR, ClipSettings, load_clip, open_data
from cvvae_jax.models.registry import model_spec
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.weights.pretrained import load_pretrained


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """The command's settings (the flags of `parser`)."""

  model: str
  data: str
  out: str
  frames: int = 17
  stride: int = 1
  resolution: tuple[int, int] = (256, 256)
  clips_per_video: int = 1
  data_kind: str = "auto"
  tiling: str = plan.DEFAULT.mode.value
  tile: int | None = None  # None: the default; in original mode the model's (`plan.TilingConfig.from_options`)
  chunk: int | None = None
  overlap: float | None = None
  dtype: str = cli.DTYPE_NAMES[0]
  batch_size: int = 8
  clips_per_shard: int = 256
  max_clips: int = 0
  split: str = ""
  data_dir: str = ""
  devices: int = 0
  workers: int = 4
  embedded_dir: str = EMBEDDED_DIR
  log_every_s: float = 10.0


def _reason(error: Exception) -> str:
  return error.reason if isinstance(error, media.BadInput) else f"unreadable ({type(error).__name__}: {error})"


class Encoder:
  """`moments(uint8 [B, T, H, W, 3]) -> (mean, logvar)` as numpy float32 `[B, 1+k, h, w, C]`, the batch split over
  this process's devices (as many as divide B, at most `limit`; 0: all); the encoder's params on every device."""

  def __init__(self, model, params, tiling: plan.TilingConfig, dtype: str, batch_size: int, limit: int = 0):
    local = sorted(jax.local_devices(), key=lambda d: d.id)
    n = min(limit or len(local), len(local))
    n = max(d for d in range(1, n + 1) if batch_size % d == 0)
    self.mesh = jax.sharding.Mesh(np.array(local[:n]), ("batch",))
    self._rows = NamedSharding(self.mesh, P("batch"))
    self.params = jax.device_put(api.params_for(params, "encode"), NamedSharding(self.mesh, P()))
    image_mode = not isinstance(model, CVVAE)

    def moments(params, video):
      x = video.astype(jnp.float32) / 127.5 - 1.0  # as the data pipeline: uint8 -> [-1, 1]
      posterior = api.encode_posterior(model, params, x, tiling=tiling, image_mode=image_mode, dtype=dtype)
      return posterior.mean.astype(jnp.float32), posterior.logvar.astype(jnp.float32)

    self._fn = moments
    self._step = jax.jit(jax.shard_map(moments, mesh=self.mesh, in_specs=(P(), P("batch")), out_specs=P("batch"),
                                       check_vma=False))

  def latent_shape(self, clip_shape: tuple[int, ...]) -> tuple[int, ...]:
    out = jax.eval_shape(self._fn, self.params, jax.ShapeDtypeStruct((1, *clip_shape), jnp.uint8))
    return tuple(out[0].shape[1:])

  def __call__(self, video: np.ndarray):
    """Dispatches the step (asynchronously); `jax.device_get` the result to wait for it."""
    return self._step(self.params, jax.device_put(video, self._rows))


class Progress:
  """Logs clips done, clips/s and the ETA every `every_s` seconds and when asked."""

  def __init__(self, total: int, every_s: float):
    self.total, self.done, self._every = total, 0, every_s
    self.start = self._last = time.perf_counter()
    self.first_batch_s: float | None = None
    self._after_first = (0, self.start)

  def add(self, n: int, force: bool = False, encoded: bool = True) -> None:
    self.done += n
    now = time.perf_counter()
    if self.first_batch_s is None and encoded and n:
      self.first_batch_s, self._after_first = now - self.start, (self.done, now)
    if force or now - self._last >= self._every:
      self._last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate else float("inf")
      logging.info("encode_latents: %d/%d clips (%.0f%%), %.2f clips/s, ETA %s", self.done, self.total,
                   100.0 * self.done / max(self.total, 1), rate, _duration(eta))

  def summary(self) -> dict[str, float]:
    now = time.perf_counter()
    seconds = now - self.start
    n0, t0 = self._after_first
    steady = (self.done - n0) / (now - t0) if self.done > n0 and now > t0 else 0.0
    return {"clips": self.done, "seconds": seconds, "clips_per_s": self.done / max(seconds, 1e-9),
            "first_batch_s": self.first_batch_s or 0.0, "steady_clips_per_s": steady}


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _prefetch(pool: concurrent.futures.Executor, fn, items, ahead: int) -> Iterator[Any]:
  """`fn(item)` for every item, in order, at most `ahead` running or waiting in `pool`."""
  items = iter(items)
  queue = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
  while queue:
    result = queue.popleft().result()
    for item in items:
      queue.append(pool.submit(fn, item))
      break
    yield result


def _prepare_out(out: str, info: dict[str, Any]) -> None:
  """Creates `out` with latents.json, or checks that the one there was written by the same command."""
  path = os.path.join(out, records.INFO_NAME)
  if os.path.exists(path):
    differences = records.settings_differences(records.read_json(path), info)
    if differences:
      raise ValueError(f"--out {out} holds latents made with other settings; rerun the command that made them or "
                       "use a new --out:\n  " + "\n  ".join(differences))
    return
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    records.write_json_atomic(path, info)


class ShardWriter:
  """One shard's records under temporary names; `commit` renames them into place (array_record, then manifest)."""

  def __init__(self, out: str, index: int, count: int, expected: range):
    self.index, self.expected = index, expected
    self.path, self.manifest = records.shard_path(out, index, count), records.manifest_path(out, index, count)
    self.tmp = f"{self.path}{records.TMP_MARK}{os.getpid()}"
    self._writer = ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
    self.clips: list[int] = []
    self.skipped: dict[str, dict[str, str]] = {}

  def write(self, meta: dict[str, Any], mean: np.ndarray, logvar: np.ndarray) -> None:
    for record in records.pack(meta, mean, logvar):
      self._writer.write(record)
    self.clips.append(int(meta["clip"]))

  def commit(self) -> None:
    self._writer.close()
    accounted = sorted(self.clips + [int(c) for c in self.skipped])
    if accounted != list(self.expected):
      raise RuntimeError(f"shard {self.index}: clips {accounted} written or skipped, expected {self.expected}")
    os.replace(self.tmp, self.path)
    records.write_json_atomic(self.manifest, {"shard": self.index, "clips": self.clips, "skipped": self.skipped})


def _remove_stale(out: str, shards: list[int], count: int) -> None:
  """Temporary files a killed run left for these shards (and, on process 0, for latents.json)."""
  stems = {records.shard_stem(s, count) for s in shards} | ({"latents"} if jax.process_index() == 0 else set())
  for name in os.listdir(out):
    if records.TMP_MARK in name and name.split(".", 1)[0] in stems:
      os.remove(os.path.join(out, name))


def encode_dataset(cfg: EncodeConfig) -> dict[str, Any]:
  """Encodes every clip of `cfg.data` into `cfg.out` (this process's shards); returns the run's throughput and, on
  process 0, the dataset summary written into latents.json."""
  described = sources.describe_data(cfg.data, kind=cfg.data_kind, data_dir=cfg.data_dir, split=cfg.split)
  is_video = described.kind == "video"
  settings = ClipSettings(int(cfg.frames) if is_video else 1, int(cfg.stride) if is_video else 1,
                          tuple(cfg.resolution), int(cfg.clips_per_video) if is_video else 1)
  tiling = plan.TilingConfig.from_options(cfg.tiling, cfg.tile, cfg.chunk, cfg.overlap)
  if cfg.batch_size < 1 or cfg.clips_per_shard < 1:
    raise ValueError(f"--batch_size and --clips_per_shard: expected >= 1, got {cfg.batch_size}, "
                     f"{cfg.clips_per_shard}")
  model, params = load_pretrained(cfg.model)
  sc, h, w = model.spatial_compression, *settings.resolution
  if h % sc or w % sc:
    raise ValueError(f"--resolution: the model compresses space {sc}x: expected multiples of {sc}, got {h}x{w}")
  if isinstance(model, CVVAE) and (settings.frames - 1) % model.temporal_compression:
    raise ValueError(f"--frames: expected 1 + {model.temporal_compression}k frames for a CV-VAE, got "
                     f"{settings.frames}")
  stats = DataStats()
  source = open_data(described, stats, embedded_dir=cfg.embedded_dir)
  num_clips = len(source) * settings.clips_per_video
  num_clips = min(num_clips, cfg.max_clips) if cfg.max_clips else num_clips
  num_shards = math.ceil(num_clips / cfg.clips_per_shard)
  encoder = Encoder(model, params, tiling, cfg.dtype, cfg.batch_size, cfg.devices)
  clip_shape = (settings.frames, h, w, 3)
  model_path = os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model
  info = {
      "format": records.FORMAT,
      "model": {"path": model_path, "class": type(model).__name__, "variant": getattr(model, "variant", None),
                "latent_channels": model.latent_channels, "scaling_factor": float(model.scaling_factor),
                "shift_factor": float(model.shift_factor), "spec": model_spec(model)},
      "data": {"data": cfg.data, **dataclasses.asdict(described), "num_videos": len(source), "frames": settings.frames,
               "stride": settings.stride, "resolution": list(settings.resolution),
               "clips_per_video": settings.clips_per_video, "crop": "center", "start": "spread"},
      "encode": {"tiling": {**dataclasses.asdict(tiling), "mode": tiling.mode.value}, "dtype": cfg.dtype,
                 "batch_size": int(cfg.batch_size)},
      "clips": {"num_clips": num_clips, "clips_per_shard": int(cfg.clips_per_shard), "num_shards": num_shards},
      "latent": {"shape": list(encoder.latent_shape(clip_shape)), "dtype": "float32",
                 "stored": "posterior mean and logvar, unscaled, channels-last [1+k, h, w, C]"},
      "versions": utils.versions(),
  }
  _prepare_out(cfg.out, info)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cvvae_encode_latents_start")  # latents.json is there for everyone
  mine = [s for s in range(num_shards) if s % jax.process_count() == jax.process_index()]
  _remove_stale(cfg.out, mine, num_shards)
  todo = [s for s in mine if not os.path.exists(records.manifest_path(cfg.out, s, num_shards))]
  first = lambda s: s * cfg.clips_per_shard
  clips = [(s, c) for s in todo for c in range(first(s), min(first(s + 1), num_clips))]
  logging.info("encode_latents: %d clips in %d shards; process %d of %d: %d shards to do (%d done), %d clips, "
               "batches of %d over %d device(s)", num_clips, num_shards, jax.process_index(), jax.process_count(),
               len(todo), len(mine) - len(todo), len(clips), cfg.batch_size, encoder.mesh.size)
  progress = Progress(len(clips), cfg.log_every_s)

  def load(item):
    shard, clip = item
    video_index, j = divmod(clip, settings.clips_per_video)
    record = None
    try:
      record = source[video_index]
      video, indices, fps = load_clip(record, settings, j, described.kind)
      meta = {"clip": clip, "video": video_index, "path": source.locate(record["key"]),
              "frames": indices.tolist(), "fps": fps}
      return shard, clip, video, meta, None
    except Exception as e:  # pylint: disable=broad-except  (a bad input is listed, never stops the job)
      where = source.locate(record["key"]) if record else source.describe(video_index)
      return shard, clip, None, {"path": where, "reason": _reason(e)}, e

  pending: collections.deque = collections.deque()  # dispatched batches: (writer, metas, result)

  def flush(keep: int) -> None:
    while len(pending) > keep:
      writer, metas, result = pending.popleft()
      mean, logvar = jax.device_get(result)
      for row, meta in enumerate(metas):
        writer.write(meta, mean[row], logvar[row])
      progress.add(len(metas))

  def dispatch(writer: ShardWriter, batch: list[tuple[np.ndarray, dict]]) -> None:
    video = np.zeros((cfg.batch_size, *clip_shape), np.uint8)  # padding rows (the shard's last batch) are dropped
    for row, (clip_video, _) in enumerate(batch):
      video[row] = clip_video
    pending.append((writer, [m for _, m in batch], encoder(video)))
    flush(keep=1)  # the host writes batch n - 1 while the devices encode batch n

  def finish(writer: ShardWriter, batch) -> None:
    if batch:
      dispatch(writer, batch)
    flush(keep=0)
    writer.commit()
    progress.add(0, force=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.workers)) as pool:
    batch: list = []
    current: ShardWriter | None = None
    for shard, clip, video, meta, error in _prefetch(pool, load, clips, ahead=2 * cfg.batch_size + cfg.workers):
      if current is None or current.index != shard:
        if current is not None:
          finish(current, batch)
          batch = []
        current = ShardWriter(cfg.out, shard, num_shards, range(first(shard), min(first(shard + 1), num_clips)))
      if error is not None:
        stats.skip(meta["path"], meta["reason"])
        current.skipped[str(clip)] = meta
        progress.add(1, encoded=False)
        continue
      batch.append((video, meta))
      if len(batch) == cfg.batch_size:
        dispatch(current, batch)
        batch = []
    if current is not None:
      finish(current, batch)
  run = progress.summary()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cvvae_encode_latents_done")
  out = {"run": run}
  if jax.process_index() == 0:
    out["summary"] = summarize(cfg.out, info, num_shards, stats)
  return out


def summarize(out: str, info: dict[str, Any], num_shards: int, stats: DataStats) -> dict[str, Any]:
  """Adds the dataset summary (clips stored, inputs skipped) to latents.json, from every shard's manifest."""
  stored, skipped = 0, dict(stats.skipped)  # the source's probe skips (folders), then each shard's
  for s in range(num_shards):
    manifest = records.read_json(records.manifest_path(out, s, num_shards))
    stored += len(manifest["clips"])
    skipped.update({m["path"]: m["reason"] for m in manifest["skipped"].values()})
  summary = {"complete": True, "num_stored": stored, "num_skipped_clips": info["clips"]["num_clips"] - stored,
             "skipped": dict(sorted(skipped.items()))}
  records.write_json_atomic(os.path.join(out, records.INFO_NAME), {**info, "summary": summary})
  return summary


def parser() -> argparse.ArgumentParser:
  d = {f.name: f.default for f in dataclasses.fields(EncodeConfig)}
  p = cli.parser("cvvae-encode-latents", __doc__)
  cli.add_model_argument(p)
  p.add_argument("--data", required=True, help="a folder of videos, a prepared TFDS name, or 'embedded'")
  p.add_argument("--out", required=True, help="the output folder (a rerun of the same command resumes it)")
  cli.add_clip_arguments(p, frames=d["frames"], stride=d["stride"], resolution=str(d["resolution"][0]))
  p.add_argument("--clips_per_video", type=int, default=d["clips_per_video"],
                 help="clips per video, their starts spread evenly over it (default 1: the first frames)")
  p.add_argument("--data_kind", default=d["data_kind"], choices=("auto", "video", "image"),
                 help="the kind of --data (auto: from the files); images are one-frame clips (--frames, --stride and "
                 "--clips_per_video are then 1)")
  plan.add_tiling_arguments(p, follow_model=True)
  cli.add_dtype_argument(p)
  p.add_argument("--batch_size", type=int, default=d["batch_size"],
                 help="clips per step in each process, split over its devices")
  p.add_argument("--clips_per_shard", type=int, default=d["clips_per_shard"], help="clips per ArrayRecord shard")
  p.add_argument("--max_clips", type=int, default=d["max_clips"], help="only the first N clips of the list (0: all)")
  p.add_argument("--split", default=d["split"], help="TFDS split (default: validation, else test, else train)")
  p.add_argument("--data_dir", default=d["data_dir"], help="TFDS data_dir")
  p.add_argument("--devices", type=int, default=d["devices"], help="devices per process (0: all that divide the "
                 "batch)")
  p.add_argument("--workers", type=int, default=d["workers"], help="threads decoding videos")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  cli.show_info_logs()
  distributed.initialize()
  fields = {f.name for f in dataclasses.fields(EncodeConfig)}

  def run() -> None:
    result = encode_dataset(EncodeConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    r = result["run"]
    line = (f"encode_latents: {r['clips']} clips in {r['seconds']:.1f} s: {r['clips_per_s']:.2f} clips/s "
            f"({r['steady_clips_per_s']:.2f} clips/s after the first batch, {r['first_batch_s']:.1f} s with "
            f"compilation)")
    if "summary" in result:
      s = result["summary"]
      line += f"; {s['num_stored']} stored, {s['num_skipped_clips']} skipped, in {args.out}"
    print(line, flush=True)

  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
