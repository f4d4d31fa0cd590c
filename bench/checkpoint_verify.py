r"""What checkpoint integrity costs: checksums at save and verification at restore, for the demo config's train state.

    python bench/checkpoint_verify.py [--workdir DIR] [--repeats 3]

The train state of `configs/cvvae.py:sd21,demo` (CV-VAE, discriminator, both optimizer states; random values of its
shapes, the frozen image VAE left out as it is never checkpointed) is saved once by the trainer's
`CheckpointManager` (synchronous) into `--workdir` (a fresh temporary folder by default; `gs://...` works), then,
`--repeats` times each: `integrity.write_checksums` (what each save adds), `integrity.verify_step` (what each
restore adds) and `CheckpointManager.restore` (the restore itself, for scale). Prints one JSON line: sizes, the
median seconds of each, and verification in s/GB. Locally the files are in the page cache after the save, so this is
the CPU cost of crc32c; a cold disk or a bucket adds one more read of the checkpoint.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import cvvae as cvvae_config
from cvvae_jax.train import build, checkpoint, integrity
from cvvae_jax.train.state import init_state


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  c = cvvae_config.get_config("sd21,demo")
  with c.unlocked():
    c.loss.reg_decoder_weight = c.loss.reg_encoder_weight = 0.0  # no frozen image VAE needed for the shapes
  models = build.build_models(c, None)
  abstract = jax.eval_shape(functools.partial(init_state, models), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)), abstract)
  workdir = args.workdir or tempfile.mkdtemp(prefix="cvvae_verify_bench_")
  manager = checkpoint.CheckpointManager(workdir, enable_async_checkpointing=False)
  t0 = time.time()
  manager.save(1, state, checkpoint.make_meta(), force=True)
  save_s = time.time() - t0
  step_dir = manager.step_dir(1)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)

  def timed(fn) -> float:
    times = []
    for _ in range(args.repeats):
      t = time.time()
      fn()
      times.append(time.time() - t)
    return statistics.median(times)

  checksums_s = timed(lambda: integrity.write_checksums(step_dir))
  verify_s = timed(lambda: integrity.verify_step(step_dir))
  restore_s = timed(lambda: manager.restore(1, target))
  manager.close()
  size = integrity.step_size(step_dir)
  print(json.dumps({
      "state_mb": round(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract)) / 1e6, 1),
      "checkpoint_mb": round(size / 1e6, 1), "files": len(integrity.read_checksums(step_dir)["files"]),
      "save_s_incl_checksums": round(save_s, 3), "checksums_s": round(checksums_s, 3),
      "verify_s": round(verify_s, 3), "verify_s_per_gb": round(verify_s / (size / 1e9), 2),
      "restore_s": round(restore_s, 3), "workdir": workdir}))


if __name__ == "__main__":
  main()
