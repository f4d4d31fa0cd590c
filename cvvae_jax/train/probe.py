"""The training probe and the reconstructions shown while training: fixed clips through the current params.

`Reconstructor` runs the (sharded) reconstruction of process 0's clips on every process, so that pictures and probe
scores come from the same clips whatever the process count; `probe_metrics` scores a probe pass on the host.
"""
from __future__ import annotations

import functools

import einops
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cvvae_jax import data as data_lib
from cvvae_jax import metrics
from cvvae_jax.train.build import Models
from cvvae_jax.train.objectives import model_input, reconstruct

Array = jax.Array


def reconstruction_arrays(models: Models, params, frozen: dict, video: Array):
  """Jittable: (reconstruction as video `[B, T, H, W, 3]`, image decoder on each latent frame `[B, L, H, W, 3]`
  or None). The image decoder row exists for CV-VAE with a frozen image VAE."""
  x = model_input(models, video)
  x_hat, post, _, _ = reconstruct(models, params["vae"], x, None)
  if not models.is_video:
    return x_hat[:, None], None
  if models.image_vae is None:
    return x_hat, None
  z = einops.rearrange(post.mode(), "b t h w c -> (b t) h w c")
  decoded = models.image_vae.apply({"params": frozen["image_vae"]}, z, method="decode")
  return x_hat, einops.rearrange(decoded, "(b t) h w c -> b t h w c", b=video.shape[0])



def process0_array(x: np.ndarray) -> np.ndarray:
  """Process 0's `x` on every process (a collective: all processes call it); `x` itself with one process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


class Reconstructor:
  """`(clips, x_hat, decoded) = reconstructor(params, clips)`: process 0's `clips` `[N, T, H, W, 3]`, their
  reconstruction with `params` and the image decoder's rows (`reconstruction_arrays`), as numpy on every process.
  A collective: every process calls it, with its own clips (only process 0's are used)."""

  def __init__(self, models: Models, mesh: jax.sharding.Mesh, frozen: dict):
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._fn = jax.jit(functools.partial(reconstruction_arrays, models), out_shardings=self._replicated)
    self._frozen = frozen

  def __call__(self, params, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    clips = process0_array(clips)
    x_hat, decoded = jax.device_get(self._fn(params, self._frozen, jax.make_array_from_callback(
        clips.shape, self._replicated, lambda index: clips[index])))
    return clips, x_hat, decoded


def load_probe(config: ml_collections.ConfigDict, models: Models) -> np.ndarray:
  """The fixed probe clips of `train.eval_every_steps`: the valid clips of the first `train.eval_batches` batches
  of `config.data.eval`, read whole by every process (the same clips everywhere, so every process runs the same
  number of probe calls), float32 `[N, T, H, W, 3]` in [-1, 1], N a multiple of `data.eval.batch_size`; for the
  image VAE every frame is an image: `[N * T, 1, H, W, 3]`."""
  batch = int(config.data.eval.batch_size)
  clips = []
  data_pass = iter(data_lib.create_eval_iterator(config.data, process_index=0, process_count=1))
  try:
    for _, b in zip(range(int(config.train.eval_batches)), data_pass):
      clips.extend(b["video"][b["mask"]])
  finally:
    data_pass.close()
  n = len(clips) // batch * batch
  if n == 0:
    raise ValueError(f"config.train.eval_every_steps: the eval set ({config.data.eval.source} "
                     f"{config.data.eval.path or config.data.eval.tfds_name}) gave {len(clips)} usable clips in "
                     f"{config.train.eval_batches} batches, fewer than config.data.eval.batch_size={batch}")
  probe = np.stack(clips[:n])
  if not models.is_video:
    probe = probe.reshape(-1, 1, *probe.shape[2:])
  return probe


def probe_metrics(video: np.ndarray, x_hat: np.ndarray, decoded: np.ndarray | None,
                  temporal_compression: int = 4) -> dict[str, float]:
  """Validation numbers of one probe pass (deterministic: the posterior mode), host side.

  `video`, `x_hat` `[N, T, H, W, 3]` in [-1, 1]; `decoded` `[N, L, H, W, 3]`: the frozen image decoder on each
  latent frame, scored against frame `4i` (the `slice` psi mapping; frame 0 for the first latent). Returns
  val/rec_l1, val/psnr (dB, data range 2, mean over clips) and, with `decoded`, val/reg_l1, val/reg_psnr.
  """
  def l1_psnr(output, target):  # PSNR unclipped: data range 2 on [-1, 1] is range 1 on [0, 1]
    l1 = np.mean(np.abs(np.asarray(output, np.float64) - np.asarray(target, np.float64)))
    psnr = metrics.psnr(np.asarray(target), np.asarray(output), clip=False, axis=range(1, np.ndim(target)))
    return float(l1), float(np.mean(psnr))

  out = dict(zip(("val/rec_l1", "val/psnr"), l1_psnr(x_hat, video)))
  if decoded is not None:
    target = np.asarray(video)[:, ::temporal_compression]
    out.update(zip(("val/reg_l1", "val/reg_psnr"), l1_psnr(decoded, target)))
  return out



def run_probe(reconstructor: Reconstructor, params, probe: np.ndarray, batch_size: int,
              temporal_compression: int) -> dict[str, float]:
  """`probe_metrics` of `params` on the probe clips, reconstructed `batch_size` clips at a time (a collective)."""
  parts = [reconstructor(params, probe[i:i + batch_size]) for i in range(0, len(probe), batch_size)]
  x_hat = np.concatenate([p[1] for p in parts])
  decoded = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
  return probe_metrics(probe, x_hat, decoded, temporal_compression)
