r"""The mid-block attention under the spatial axis: left height-split vs gathered first (`models/partitioning.py`).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/spatial_attention.py [--size 9,128,128]
        [--channels 128,256,512,512] [--spatial 4] [--dtype bfloat16]

Compiles (nothing runs) the CV-VAE's reconstruction loss and its gradients, one clip on `--spatial` devices with the
trainer's mesh and activation constraints (`train/sharding.py`), once per `gather_attention` setting, and prints
XLA's per-device memory analysis (GiB), FLOPs and compile time for each, as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from cvvae_jax.models.partitioning import ActivationSharding
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.train import sharding


def measure(size, channels, spatial, dtype, gather) -> dict:
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "spatial": spatial}, devices=jax.devices()[:spatial])
  act = ActivationSharding(mesh, sharding.BATCH_AXES, sharding.SPATIAL_AXIS, gather_attention=gather)
  vae = CVVAE(block_out_channels=channels, dtype=dtype, conv_impl="xla", upsample_impl="xla", remat="full",
              activation_sharding=act)
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32, sharding=sharding.batch_sharding(mesh, 5))
  params = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, 8, 8, 3)))["params"]
  loss = lambda p, x: jnp.mean(jnp.abs(vae.apply({"params": p}, x)[0] - x))
  t = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: round(n / 2**30, 3)
  return {"gather_attention": gather, "size": list(size), "spatial": spatial,
          "compile_s": round(time.perf_counter() - t, 1), "temp_gib": gib(m.temp_size_in_bytes),
          "argument_gib": gib(m.argument_size_in_bytes),
          "tflop_per_device": round(float(cost.get("flops", 0.0)) / 1e12, 4)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="9,128,128", help="T,H,W of the clip")
  parser.add_argument("--channels", default="128,256,512,512")
  parser.add_argument("--spatial", type=int, default=4)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  size = tuple(int(s) for s in args.size.split(","))
  channels = tuple(int(c) for c in args.channels.split(","))
  for gather in (False, True):
    print(json.dumps(measure(size, channels, args.spatial, jnp.dtype(args.dtype), gather)), flush=True)


if __name__ == "__main__":
  main()
