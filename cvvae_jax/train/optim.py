"""Optax optimizers of CV-VAE training, built from `config.optim` (see `make_optimizer_config`).

Released config (`configs/cvvae_sd3_constraint_training.yaml` + `lvdm/models/autoencoder.py`): AdamW
(b1 0.9, b2 0.98, eps 1e-4, weight decay 0.01 on every parameter), gradients clipped to global norm 1.0
before each step; generator lr 2e-5 * lr_g_factor 2 = 4e-5 with 1000 linear warm-up steps then cosine to
0.5% of the peak; discriminator lr 2e-5 constant; generator and discriminator updated on alternate batches.

Schedules are functions of the **training step** (batch count): the original steps both lr schedulers on
every batch, while each optimizer only updates on every other batch. Optax feeds a schedule its own
update count, so the optimizers here evaluate `schedule(count * steps_per_update)`; with
`steps_per_update = 2` (alternating G/D, as released) the generator's n-th update uses the lr of batch 2n,
as in the original. Set it to 1 if both are updated on every batch. Log `generator_lr_schedule(cfg)(step)`.
With `generator_only_steps = N` (`train.generator_only_before_gan`: N = `loss.disc_start`; not in the original,
which before the GAN starts spends every other batch on a discriminator update whose loss is 0) the first N
batches update only the generator; `step_of_update` maps each optimizer's update count to its batch.

Difference from the original: its cosine (`num_training_steps: 60000` of a 200k-step run) keeps following
cos(pi * progress) past the end, so its lr rises again; optax holds the floor after `total_steps`. We
default `total_steps` to the run length (200k), so the lr decays once over the whole run.

Frozen parameters (the SD image VAE used by the latent regularizer): keep them **out of the optimized
parameter tree** (pass them to the step separately and close over them in `image_decode`); then no
gradients and no optimizer state exist for them. `freeze` is the fallback for frozen leaves that must live
inside the optimized tree: `optax.multi_transform` with `optax.set_to_zero()` gives them zero updates and
no Adam moments (their slots in the inner state are `optax.MaskedNode`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_optimizer_config() -> ml_collections.ConfigDict:
  """Defaults of `config.optim` (the released settings). Discriminator AdamW settings and clipping are
  tied to the generator's by reference (override either; overriding the discriminator's breaks the tie).

  Fields:
      steps_per_update: training steps between two updates of one optimizer (2: G and D alternate).
      generator: peak_lr 4e-5, warmup_steps 1000 (training steps), total_steps 200_000 (warm-up included),
    end_lr_ratio 0.005, b1 0.9, b2 0.98, eps 1e-4, weight_decay 0.01, clip_norm 1.0.
      discriminator: lr 2e-5 (constant) and the same b1, b2, eps, weight_decay, clip_norm.
  """
  cfg = ml_collections.ConfigDict()
  cfg.steps_per_update = 2
  cfg.generator = ml_collections.ConfigDict(
    dict(
      peak_lr=4e-5,
      warmup_steps=1000,
      total_steps=200_000,
      end_lr_ratio=0.005,
      b1=0.9,
      b2=0.98,
      eps=1e-4,
      weight_decay=0.01,
      clip_norm=1.0,
    )
  )
  g = cfg.generator
  cfg.discriminator = ml_collections.ConfigDict(
    dict(
      lr=2e-5,
      b1=g.get_ref("b1"),
      b2=g.get_ref("b2"),
      eps=g.get_ref("eps"),
      weight_decay=g.get_ref("weight_decay"),
      clip_norm=g.get_ref("clip_norm"),
    )
  )
  return cfg


def generator_lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Generator lr as a function of the training step: linear 0 -> peak_lr over warmup_steps, then cosine
  to end_lr_ratio * peak_lr at total_steps, constant after."""
  g = cfg.generator
  if not 0 <= g.warmup_steps < g.total_steps:
    raise ValueError(
      f"expected 0 <= warmup_steps < total_steps, got warmup_steps={g.warmup_steps}, "
      f"total_steps={g.total_steps}"
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=g.peak_lr,
    warmup_steps=g.warmup_steps,
    decay_steps=g.total_steps,
    end_value=g.peak_lr * g.end_lr_ratio,
  )


def discriminator_lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Discriminator lr as a function of the training step (constant)."""
  return optax.constant_schedule(cfg.discriminator.lr)


def step_of_update(count, steps_per_update: int, generator_only_steps: int = 0, discriminator: bool = False):
  """The training step of an optimizer's `count`-th update (0-based; traceable). The generator updates on each of
  the first `generator_only_steps` steps, then on the steps that are 0 mod `steps_per_update`; the discriminator
  on the steps from `generator_only_steps` on that are 1 mod `steps_per_update` (every one when it is 1)."""
  if not isinstance(steps_per_update, int) or steps_per_update < 1:
    raise ValueError(f"expected steps_per_update to be an int >= 1, got {steps_per_update!r}")
  if not isinstance(generator_only_steps, int) or generator_only_steps < 0:
    raise ValueError(f"expected generator_only_steps to be an int >= 0, got {generator_only_steps!r}")
  k, s0 = steps_per_update, generator_only_steps
  first = s0 + ((1 if discriminator else 0) - s0) % k  # the first step >= s0 of this optimizer
  if discriminator:
    return first + k * count
  return jnp.where(count < s0, count, first + k * (count - s0))


def _per_update(schedule: optax.Schedule, steps_per_update: int, generator_only_steps: int,
                discriminator: bool) -> optax.Schedule:
  step_of_update(0, steps_per_update, generator_only_steps)  # argument errors now, not at the first update
  return lambda count: schedule(step_of_update(count, steps_per_update, generator_only_steps, discriminator))


def _adamw(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(opt.clip_norm),
    optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
  )


def make_generator_optimizer(cfg: ml_collections.ConfigDict,
                             generator_only_steps: int = 0) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) then AdamW with `generator_lr_schedule` (per update, see module doc; the first
  `generator_only_steps` batches update only the generator).

  Its parameters: video encoder and decoder, `logvar`, `logvar_2d` (weight decay applies to all, as
  torch AdamW on one parameter group).
  """
  lr = _per_update(generator_lr_schedule(cfg), cfg.steps_per_update, generator_only_steps, discriminator=False)
  return _adamw(cfg.generator, lr)


def make_discriminator_optimizer(cfg: ml_collections.ConfigDict,
                                 generator_only_steps: int = 0) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) then AdamW with the constant discriminator lr."""
  lr = _per_update(discriminator_lr_schedule(cfg), cfg.steps_per_update, generator_only_steps, discriminator=True)
  return _adamw(cfg.discriminator, lr)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def param_labels(params, frozen: Sequence[str]):
  """Labels each leaf "frozen" if its path ("a/b/c") equals or lies under one of `frozen`, else
  "trainable". Strict: a prefix that matches no leaf raises (a typo would silently train the subtree)."""
  frozen = tuple(p.strip("/") for p in frozen)
  used = set()

  def label(path, _):
    name = _path_name(path)
    for prefix in frozen:
      if name == prefix or name.startswith(prefix + "/"):
        used.add(prefix)
        return "frozen"
    return "trainable"

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = [p for p in frozen if p not in used]
  if unused:
    names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(
      f"expected every frozen prefix to match a parameter, these match none: {unused}; "
      f"parameters start with {sorted({n.split('/')[0] for n in names})}"
    )
  return labels


def freeze(tx: optax.GradientTransformation, frozen: Sequence[str]) -> optax.GradientTransformation:
  """Wraps `tx` so the subtrees named in `frozen` (path prefixes, e.g. "sd_vae") get zero updates and
  no optimizer state; the rest is updated by `tx` (its clipping sees only the trainable gradients)."""
  return optax.multi_transform(
    {"trainable": tx, "frozen": optax.set_to_zero()},
    lambda params: param_labels(params, frozen),
  )
