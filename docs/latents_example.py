r"""Latents for diffusion training, end to end (docs/latents.md): encode the embedded clips with the encode command,
read them back with the latent loader, train a toy denoiser on them under a 2-device mesh, and decode its output
with the frozen VAE inside a jitted, sharded step.

    python docs/latents_example.py --model PATH [--out DIR] [--steps 4]

`--model` is any CV-VAE `load_pretrained` reads (a released folder, a training workdir, ...). On a CPU-only machine
the script asks XLA for 2 host devices; on accelerators it uses the first 2.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # before JAX starts

import argparse
import functools
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import cvvae_jax
from cvvae_jax import encode_latents, inference, latents


class Denoiser(nn.Module):
  """A toy epsilon-predictor on latents `[B, T, h, w, C]` (a diffusion model would go here)."""

  channels: int

  @nn.compact
  def __call__(self, x, t):
    h = nn.Conv(32, (1, 3, 3))(x) + nn.Dense(32)(t[:, None])[:, None, None, None]
    return nn.Conv(self.channels, (1, 3, 3))(nn.silu(h))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--out", default="")
  p.add_argument("--steps", type=int, default=4)
  args = p.parse_args(argv)
  out = args.out or os.path.join(tempfile.mkdtemp(), "latents")

  # 1. Encode once: every embedded training clip, 9 frames at 32x48 (the command a user runs; resumable).
  status = encode_latents.main([f"--model={args.model}", "--data=embedded", "--split=train", f"--out={out}",
                                "--frames=9", "--stride=2", "--resolution=32x48", "--batch_size=2"])
  if status:
    return status

  # 2. The mesh: the batch split over 2 devices ("data"); every host feeds its own rows.
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  # 3. The loader: scaled latents, a fresh posterior sample per epoch (rng), shuffled, resumable from a step.
  ds = latents.dataset(out, batch_size=4, seed=0, rng=0)
  shape = ds.data.shape  # [1+k, h, w, C]
  denoiser = Denoiser(channels=shape[-1])
  params = denoiser.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,)))
  tx = optax.adam(1e-3)
  state = jax.device_put((params, tx.init(params)), replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, rows, replicated), out_shardings=(replicated, replicated),
                     donate_argnums=0)
  def train_step(state, z0, key):  # a toy DDPM step on the latents: predict the noise of a random level
    params, opt_state = state
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (z0.shape[0],))
    eps = jax.random.normal(k_eps, z0.shape)
    alpha = jnp.cos(0.5 * jnp.pi * t)[:, None, None, None, None]
    zt = alpha * z0 + jnp.sqrt(1 - alpha ** 2) * eps
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(denoiser.apply(p, zt, t) - eps)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  # 4. The frozen VAE inside our own jitted, sharded step: its params are an argument (not constants baked into
  #    the program), the latents arrive sharded over "data", compute in bf16; one compilation for every call.
  vae, vae_params = cvvae_jax.load_pretrained(args.model)
  vae_params = jax.device_put(inference.params_for(vae_params, "decode"), replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, replicated, rows), out_shardings=rows)
  def preview(vae_params, params, z):  # one denoising pass at t = 0.5, then decode to frames
    t = jnp.full((z.shape[0],), 0.5)
    alpha = jnp.cos(0.25 * jnp.pi)
    z0 = (z - jnp.sqrt(1 - alpha ** 2) * denoiser.apply(params, z, t)) / alpha
    return inference.decode(vae, vae_params, z0, dtype=jnp.bfloat16)

  for step in range(args.steps):
    batch = next(ds)
    z = jax.make_array_from_process_local_data(rows, batch["latents"])
    state, loss = train_step(state, z, jax.random.fold_in(jax.random.key(1), step))
    video = preview(vae_params, state[0], z)
    print(f"step {step}: loss {float(loss):.4f}, clips {batch['clip'].tolist()}, preview {video.shape} "
          f"{video.dtype} on {len(video.sharding.device_set)} devices", flush=True)
  print(f"compilations: train_step {train_step._cache_size()}, preview {preview._cache_size()}; "
        f"loader at step {ds.state()['step']}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
