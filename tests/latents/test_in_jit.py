"""The frozen VAE inside a user's own jitted, sharded step (docs/latents.md): params as an argument, the batch
sharded over a 2-device mesh, bf16 compute, one compilation for every call."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cvvae_jax import inference, load_pretrained
from tests import helpers

pytestmark = pytest.mark.slow  # compiles the tiny model's encoder and decoder in bf16 on 2 devices (1-1.5 min here)


def test_frozen_vae_in_a_jitted_sharded_step_compiles_once(tiny_model):
  vae, vae_params = load_pretrained(tiny_model)
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  vae_params = jax.device_put(vae_params, replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, rows, replicated), out_shardings=(rows, replicated))
  def step(vae_params, video, key):  # a user's step: encode (a posterior sample), a toy loss on the decode
    z = jax.lax.stop_gradient(inference.encode(vae, vae_params, video, rng=key, dtype=jnp.bfloat16))
    recon = inference.decode(vae, vae_params, z, dtype=jnp.bfloat16)
    return z, jnp.mean(jnp.square(recon.astype(jnp.float32) - video))

  outs = []
  for i in range(3):
    video = jax.device_put(helpers.tiny_input((2, 5, 16, 16, 3), seed=i), rows)
    outs.append(step(vae_params, video, jax.random.key(i)))
  assert step._cache_size() == 1  # one compilation for every call
  z, loss = outs[0]
  assert z.shape == (2, 2, 2, 2, 4) and z.sharding.spec == P("data") and np.isfinite(float(loss))
  assert not np.array_equal(outs[0][0], outs[1][0])

  # The params are an argument, not constants baked into the program: other values, the same executable.
  halved = jax.tree_util.tree_map(lambda p: p * 0.5, vae_params)
  video = jax.device_put(helpers.tiny_input((2, 5, 16, 16, 3), seed=0), rows)
  z_half, _ = step(halved, video, jax.random.key(0))
  assert step._cache_size() == 1 and not np.allclose(z_half, z)
  lowered = step.lower(vae_params, video, jax.random.key(0))
  assert len(jax.tree_util.tree_leaves(lowered.args_info[0][0])) == len(jax.tree_util.tree_leaves(vae_params))
  # bf16 compute: the encoder's convolutions run in bf16
  assert "bf16" in lowered.as_text()
