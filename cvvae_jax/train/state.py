"""The train state: everything a resumed run needs besides the data position (the step), and its initial value."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cvvae_jax.models import registry
from cvvae_jax.train.build import Models

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs (with the data position, which is the step).

  params: {"vae": the trained VAE's params, "logvar": (), "logvar_2d": ()} (the generator side).
  ema_params: an EMA of params["vae"] (empty dict when `train.ema_decay` is 0).
  nan_skips / nan_streak: updates skipped for non-finite loss or gradients, in total / in a row.
  """

  step: Array
  params: Any
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  ema_params: Any
  nan_skips: Array
  nan_streak: Array



def init_state(models: Models, rng: Array, vae_params: Any | None = None) -> TrainState:
  """A fresh TrainState (pure; jit it with `out_shardings`). `vae_params` replaces the random VAE init."""
  k_vae, k_disc = jax.random.split(rng)
  if vae_params is None:
    vae_params = models.vae.init(k_vae, registry.example_input(models.vae))["params"]
  disc_params = models.disc.init(k_disc, registry.example_input(models.disc))["params"]
  logvar_init = jnp.asarray(models.weights.logvar_init, jnp.float32)
  params = {"vae": vae_params, "logvar": logvar_init, "logvar_2d": logvar_init}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params, opt_state=models.tx.init(params),
      disc_opt_state=models.disc_tx.init(disc_params),
      ema_params=jax.tree_util.tree_map(jnp.copy, vae_params) if models.ema_decay > 0 else {},
      nan_skips=jnp.zeros((), jnp.int32), nan_streak=jnp.zeros((), jnp.int32))

