"""The training step: `train_step(state, batch, rng, frozen) -> (state, metrics)`, pure, and `TrainStep`, its jitted
programs with explicit shardings; gradient accumulation, the NaN guard, the EMA, and metric averaging on device."""
from __future__ import annotations

import enum
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cvvae_jax.train import sharding
from cvvae_jax.train.build import Models
from cvvae_jax.train.objectives import discriminator_objective, generator_objective, model_input
from cvvae_jax.train.state import TrainState

Array = jax.Array


def micro_batches(models: Models, batch_shape: tuple[int, ...], mesh: jax.sharding.Mesh | None) -> int:
  """How many micro-batches a step on the global batch `batch_shape` (`[B, T, H, W, 3]`) accumulates:
  `train.grad_accum_steps`, or for 1-frame (image) batches with `train.image_micro_batch` = n > 0, this device's
  images / n (the image stream's 8 images of 320x320 per device hold 4.9x the memory of one at a time on XLA:CPU,
  bench/README_train.md)."""
  per = models.image_micro_batch
  if not per or batch_shape[1] != 1:
    return models.grad_accum_steps
  local = batch_shape[0] // (sharding.batch_devices(mesh) if mesh is not None else 1)
  if local % per:
    raise ValueError(f"config.train.image_micro_batch={per} must divide the images per device of the image batch, "
                     f"{local} (global batch {batch_shape[0]})")
  return local // per


def _accumulated_grads(loss_fn: Callable, params, x: Array, rng: Array, accum: int, loop: str = "scan"):
  """Mean loss, metrics and gradients over `accum` micro-batches of `x` (split along the batch), in a `lax.scan`
  or unrolled (`loop`, as `build.resolve_accum_loop` gives it; the same sums in the same order).

  Micro-batch j holds examples j, j + accum, j + 2 accum, ...: the batch is split over the devices in contiguous
  blocks, so each micro-batch holds the same share of every device's examples and keeps the batch's sharding (a
  split into contiguous blocks would put each micro-batch on a 1/accum of the devices)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, metrics), grads = grad_fn(params, x, rng)
    return loss, metrics, grads
  if x.shape[0] % accum:
    raise ValueError(f"config.train.grad_accum_steps={accum} must divide the batch size {x.shape[0]}")
  micro = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  rngs = jax.random.split(rng, accum)
  flat = lambda out: (out[0][0], out[0][1], out[1])  # ((loss, metrics), grads) -> (loss, metrics, grads)
  add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
  zero = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: flat(grad_fn(params, micro[0], rngs[0]))))
  if loop == "unrolled":
    total = zero
    for j in range(accum):
      total = add(total, flat(grad_fn(params, micro[j], rngs[j])))
  else:
    total, _ = jax.lax.scan(lambda carry, inputs: (add(carry, flat(grad_fn(params, *inputs))), None), zero,
                            (micro, rngs))
  return jax.tree_util.tree_map(lambda v: v / accum, total)


def _guarded_update(tx, grads, opt_state, params, loss):
  """An optax update applied only when the loss and every gradient are finite."""
  finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g))
                                                   for g in jax.tree_util.tree_leaves(grads)]))
  safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
  updates, new_opt_state = tx.update(safe_grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), finite


class Update(enum.Enum):
  """What one step updates: the generator, the discriminator (alternating, as the original), or both."""

  GENERATOR = "generator"
  DISCRIMINATOR = "discriminator"
  BOTH = "both"


def update_for_step(step: int, alternate: bool, generator_only_steps: int = 0) -> Update:
  """The update of (host-side) step `step`: G alone on the first `generator_only_steps` steps; then G on even
  steps and D on odd ones when alternating, else both (`optim.step_of_update` says the same per optimizer)."""
  if step < generator_only_steps:
    return Update.GENERATOR
  if not alternate:
    return Update.BOTH
  return Update.GENERATOR if step % 2 == 0 else Update.DISCRIMINATOR


def train_step(state: TrainState, batch: dict, rng: Array, frozen: dict, *, models: Models,
               update: Update = Update.BOTH, mesh: jax.sharding.Mesh | None = None):
  """One training step -> (new state, metrics). Pure; `rng` is the run's root key (folded with the step).

  `mesh` (the jit's, or None): the images per device of an image batch (`micro_batches`); on a mesh that splits
  both the parameters and the height, the parameters are gathered for the compute, a workaround for an XLA
  partitioner bug: the autoencoders' (the CV-VAE, the frozen image VAE) by their layers where each kernel is used
  (their `activation_sharding`, `partitioning.gather_at_use`: under remat a unit gathers its kernels again in the
  backward pass rather than keeping a copy), the discriminator's and LPIPS's whole at the start
  (`sharding.params_at_use`).

  `update` is static: the loop calls the generator and discriminator variants on alternate steps (two compiled
  programs; a traced `lax.cond` between them ran 2x slower than both updates together on XLA's CPU backend).
  The GAN switch at `disc_start` is traced (`losses.disc_factor`), so it never recompiles.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_g, rng_d = jax.random.split(rng)
  x = model_input(models, batch["video"])
  accum = micro_batches(models, batch["video"].shape, mesh)
  step = state.step
  metrics, finite = {}, jnp.array(True)
  at_use = lambda tree: sharding.params_at_use(tree, mesh)
  frozen = {name: tree if name == "image_vae" else at_use(tree) for name, tree in frozen.items()}

  if update in (Update.GENERATOR, Update.BOTH):
    loss_fn = lambda p, xi, ri: generator_objective(p, at_use(state.disc_params), frozen, xi, ri, step, models)
    loss, g_metrics, grads = _accumulated_grads(loss_fn, state.params, x, rng_g, accum, models.accum_loop)
    params, opt_state, g_finite = _guarded_update(models.tx, grads, state.opt_state, state.params, loss)
    ema = state.ema_params
    if models.ema_decay > 0:
      d = models.ema_decay
      ema = jax.tree_util.tree_map(lambda e, p: jnp.where(g_finite, d * e + (1 - d) * p, e), ema, params["vae"])
    state = state.replace(params=params, opt_state=opt_state, ema_params=ema)
    metrics.update(g_metrics)
    metrics.update({"grad_norm/generator": optax.global_norm(grads), "lr/generator": models.lr_schedule(step)})
    finite &= g_finite

  if update in (Update.DISCRIMINATOR, Update.BOTH):
    loss_fn = lambda p, xi, ri: discriminator_objective(at_use(p), state.params["vae"], xi, ri, step, models)
    loss, d_metrics, grads = _accumulated_grads(loss_fn, state.disc_params, x, rng_d, accum, models.accum_loop)
    disc_params, disc_opt_state, d_finite = _guarded_update(models.disc_tx, grads, state.disc_opt_state,
                                                            state.disc_params, loss)
    state = state.replace(disc_params=disc_params, disc_opt_state=disc_opt_state)
    metrics.update(d_metrics)
    metrics.update({"grad_norm/discriminator": optax.global_norm(grads),
                    "lr/discriminator": models.disc_lr_schedule(step)})
    finite &= d_finite

  nan_skips = state.nan_skips + jnp.where(finite, 0, 1)
  nan_streak = jnp.where(finite, 0, state.nan_streak + 1)
  state = state.replace(step=step + 1, nan_skips=nan_skips, nan_streak=nan_streak)
  metrics.update({"guard/finite": finite.astype(jnp.float32), "guard/nan_skips": nan_skips.astype(jnp.float32)})
  return state, metrics


class TrainStep:
  """`train_step` jitted with explicit shardings (state donated), one program per `Update` (and input shape).

      state, metrics, update = step_fn(state, batch, rng, frozen, step)   # `step`: the host's step counter
  """

  def __init__(self, models: Models, mesh, state_shardings, frozen_shardings):
    self.models = models
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sh = {"video": sharding.batch_sharding(mesh, 5)}  # [B, T, H, W, 3]: batch and height split
    self._fns = {
        update: jax.jit(functools.partial(train_step, models=models, update=update, mesh=mesh),
                        in_shardings=(state_shardings, batch_sh, replicated, frozen_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        for update in Update}

  def __call__(self, state: TrainState, batch: dict, rng: Array, frozen: dict, step: int):
    update = update_for_step(step, self.models.alternate, self.models.generator_only_steps)
    state, metrics = self._fns[update](state, batch, rng, frozen)
    return state, metrics, update


class MetricWindow:
  """Averages step metrics over a logging window on the device (no host sync until `result`)."""

  def __init__(self):
    self._sums: dict[Update, Any] = {}
    self._counts: dict[Update, int] = {}

  def add(self, update: Update, metrics: dict) -> None:
    prev = self._sums.get(update)
    self._sums[update] = metrics if prev is None else jax.tree_util.tree_map(jnp.add, prev, metrics)
    self._counts[update] = self._counts.get(update, 0) + 1

  def result(self) -> dict[str, float]:
    out = {}
    for update, sums in self._sums.items():
      n = self._counts[update]
      out.update({k: float(v) / n for k, v in jax.device_get(sums).items()})
    self._sums, self._counts = {}, {}
    return out
