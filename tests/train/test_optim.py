"""Tests for cvvae_jax/optim.py: config defaults, lr schedules, clipping, AdamW steps, freezing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvvae_jax.train import optim


def test_config_defaults_and_ties():
  cfg = optim.make_optimizer_config()
  g, d = cfg.generator, cfg.discriminator
  assert cfg.steps_per_update == 2
  assert (g.peak_lr, g.warmup_steps, g.total_steps, g.end_lr_ratio) == (4e-5, 1000, 200_000, 0.005)
  assert (g.b1, g.b2, g.eps, g.weight_decay, g.clip_norm) == (0.9, 0.98, 1e-4, 0.01, 1.0)
  assert (d.lr, d.b1, d.b2, d.eps, d.weight_decay, d.clip_norm) == (2e-5, 0.9, 0.98, 1e-4, 0.01, 1.0)
  cfg.generator.b2 = 0.99
  assert cfg.discriminator.b2 == 0.99


def hf_cosine(step, peak=4e-5, warmup=1000, total=200_000, ratio=0.005):
  """The original's schedule (transformers cosine with min_lr_ratio), inside [0, total]."""
  if step < warmup:
    return peak * step / warmup
  progress = (step - warmup) / (total - warmup)
  return peak * 0.5 * ((1 + ratio) + (1 - ratio) * math.cos(math.pi * progress))


def test_generator_schedule_values():
  cfg = optim.make_optimizer_config()
  sched = optim.generator_lr_schedule(cfg)
  np.testing.assert_allclose(sched(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(sched(500), 2e-5, rtol=1e-5)
  np.testing.assert_allclose(sched(1000), 4e-5, rtol=1e-5)
  np.testing.assert_allclose(sched(100_500), (4e-5 + 2e-7) / 2, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(sched(200_000), 2e-7, rtol=1e-4)  # end: 0.5% of peak
  np.testing.assert_allclose(sched(300_000), 2e-7, rtol=1e-4)  # held after the end
  for step in (1, 999, 1001, 7_777, 123_456, 199_999):
    np.testing.assert_allclose(sched(step), hf_cosine(step), rtol=1e-4)
  np.testing.assert_allclose(optim.discriminator_lr_schedule(cfg)(12345), 2e-5)
  cfg.generator.warmup_steps = 200_000
  with pytest.raises(ValueError, match="warmup_steps < total_steps"):
    optim.generator_lr_schedule(cfg)


def adam_moments(state):
  return optax.tree_utils.tree_get(state, "mu"), optax.tree_utils.tree_get(state, "nu")


def test_generator_optimizer_clips_and_follows_schedule():
  cfg = optim.make_optimizer_config()
  tx = optim.make_generator_optimizer(cfg)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([30.0, 40.0])}  # global norm 50 -> clipped to [0.6, 0.8]
  state = tx.init(params)
  upd, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(upd["w"], 0.0)  # update 0 = training step 0: lr 0
  mu, nu = adam_moments(state)
  np.testing.assert_allclose(mu["w"], [0.06, 0.08], rtol=1e-6)  # (1 - b1) * clipped grad
  np.testing.assert_allclose(nu["w"], [0.02 * 0.36, 0.02 * 0.64], rtol=1e-6)
  upd, state = tx.update(grads, state, params)
  lr = 4e-5 * 2 / 1000  # update 1 = training step 2 (steps_per_update = 2)
  # both moments are bias-corrected back to the clipped grad: m_hat = g, sqrt(v_hat) = |g|
  g = np.array([0.6, 0.8])
  expected = -lr * (g / (g + 1e-4) + 0.01 * np.array([1.0, -2.0]))
  np.testing.assert_allclose(upd["w"], expected, rtol=1e-4)  # float32 bias corrections


def test_generator_only_steps_keep_the_lr_a_function_of_the_training_step():
  # G alone on steps 0..4, then G on even and D on odd steps: G's updates at steps 0,1,2,3,4,6,8; D's at 5,7,9.
  steps = [int(optim.step_of_update(jnp.int32(n), 2, 5)) for n in range(7)]
  assert steps == [0, 1, 2, 3, 4, 6, 8]
  assert [int(optim.step_of_update(n, 2, 5, discriminator=True)) for n in range(3)] == [5, 7, 9]
  assert [int(optim.step_of_update(n, 2, 4)) for n in range(6)] == [0, 1, 2, 3, 4, 6]
  assert [int(optim.step_of_update(n, 2, 4, discriminator=True)) for n in range(2)] == [5, 7]
  assert [int(optim.step_of_update(n, 2)) for n in range(3)] == [0, 2, 4]  # as released
  assert [int(optim.step_of_update(n, 1, 3, discriminator=True)) for n in range(2)] == [3, 4]  # both every step
  with pytest.raises(ValueError, match="generator_only_steps to be an int >= 0"):
    optim.step_of_update(0, 2, -1)

  cfg = optim.make_optimizer_config()
  cfg.generator.warmup_steps, cfg.generator.total_steps = 10, 40
  schedule = optim.generator_lr_schedule(cfg)
  tx = optim.make_generator_optimizer(cfg, generator_only_steps=5)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"w": jnp.array([0.3, 0.4])}
  for n, step in enumerate(steps):
    upd, new_state = tx.update(grads, state, params)
    # the update of a unit gradient direction at lr(step): AdamW's step is -lr * (m_hat / (sqrt(v_hat) + eps))
    m_hat, v_hat = grads["w"], grads["w"] ** 2
    np.testing.assert_allclose(upd["w"], -schedule(step) * m_hat / (jnp.sqrt(v_hat) + 1e-4), rtol=2e-4, atol=1e-12,
                               err_msg=f"update {n} = step {step}")
    state = new_state


def test_small_gradients_are_not_clipped():
  tx = optim.make_generator_optimizer(optim.make_optimizer_config())
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([0.3, 0.4])}, state, params)  # norm 0.5 < 1
  np.testing.assert_allclose(adam_moments(state)[0]["w"], [0.03, 0.04], rtol=1e-6)


def test_discriminator_optimizer_constant_lr():
  tx = optim.make_discriminator_optimizer(optim.make_optimizer_config())
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  upd, _ = tx.update({"w": jnp.array([-30.0, 40.0])}, state, params)
  g = np.array([-0.6, 0.8])
  np.testing.assert_allclose(upd["w"], -2e-5 * (g / (np.abs(g) + 1e-4) + 0.01 * np.array([1.0, -2.0])), rtol=1e-5)


def test_freeze_keeps_no_state_and_zero_updates():
  cfg = optim.make_optimizer_config()
  params = {
    "vae": {"decoder": {"conv_out": {"kernel": jnp.ones((3,))}}},
    "sd_vae": {"decoder": {"kernel": jnp.ones((4,))}, "encoder": {"kernel": jnp.ones((5,))}},
    "logvar": jnp.zeros(()),
  }
  labels = optim.param_labels(params, ["sd_vae"])
  assert labels["sd_vae"]["encoder"]["kernel"] == "frozen"
  assert labels["vae"]["decoder"]["conv_out"]["kernel"] == "trainable"
  assert labels["logvar"] == "trainable"
  tx = optim.freeze(optim.make_generator_optimizer(cfg), ["sd_vae"])
  state = tx.init(params)
  mu, nu = adam_moments(state)
  assert isinstance(mu["sd_vae"]["decoder"]["kernel"], optax.MaskedNode)
  # Adam moments exist for the trainable 3-vector and scalar logvar only
  assert sum(x.size for x in jax.tree_util.tree_leaves(mu)) == 4
  assert sum(x.size for x in jax.tree_util.tree_leaves(nu)) == 4
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
  for _ in range(2):
    upd, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(upd["sd_vae"]["decoder"]["kernel"], 0.0)
  np.testing.assert_array_equal(upd["sd_vae"]["encoder"]["kernel"], 0.0)
  assert float(jnp.abs(upd["vae"]["decoder"]["conv_out"]["kernel"]).min()) > 0
  with pytest.raises(ValueError, match=r"these match none: \['sd'\]"):
    optim.param_labels(params, ["sd"])  # prefixes match whole path components
  np.testing.assert_equal(optim.param_labels(params, ["sd_vae/decoder"])["sd_vae"]["encoder"]["kernel"], "trainable")
