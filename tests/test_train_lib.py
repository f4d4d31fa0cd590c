"""The sharded train step and the loop: mesh parity, NaN guard, disc_start without recompiling, exact resume."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cvvae_jax
from configs import cvvae as cvvae_config
from cvvae_jax import lpips, sharding, train_lib
from tests import helpers

CH = (32, 32, 32, 32)


def tiny_config(image_vae_path: str = "", num_steps: int = 4):
  """The demo config shrunk to seconds per step: tiny CV-VAE and discriminator, 5x16x16 clips, batch 8."""
  c = cvvae_config.get_config("sd21,demo")
  with c.unlocked():
    c.model.block_out_channels = CH
    c.discriminator.ndf, c.discriminator.n_layers = 32, 1
    c.image_vae.path = image_vae_path
    c.loss.disc_start = 2
    c.loss.perceptual_weight = 0.0  # LPIPS has its own tests; without it these compile in seconds
    c.train.num_steps = num_steps
    c.train.log_every_steps = 1
    c.train.image_every_steps = 1000
    c.train.checkpoint_every_steps = 2
    c.train.async_checkpoints = False
    c.optim.generator.total_steps = 100
    video = c.data.streams.video
    video.frames, video.size, video.short_side, video.batch_size, video.stride = 5, (16, 16), (16, 20), 8, (1, 2)
    del c.data.streams["image"]
  return c


@pytest.fixture(scope="module")
def image_vae_dir(tmp_path_factory):
  vae = cvvae_jax.ImageVAE(block_out_channels=CH, layers_per_block=1, latent_channels=4)
  params = jax.jit(vae.init)(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 3)))["params"]
  return cvvae_jax.save_flax(vae, params, str(tmp_path_factory.mktemp("image_vae")))


@pytest.fixture(scope="module")
def setup(image_vae_dir):
  config = tiny_config(image_vae_dir)
  image_vae, frozen = train_lib.load_frozen(config, "cvvae")
  models = train_lib.build_models(config, image_vae)
  state = jax.jit(functools.partial(train_lib.init_state, models))(jax.random.PRNGKey(0))
  batch = {"video": helpers.tiny_input((8, 5, 16, 16, 3), seed=3)}
  return models, frozen, state, batch


def _step_on(mesh, models, frozen, state, batch, update):
  abstract = jax.eval_shape(lambda: state)
  state_sh = sharding.state_shardings(abstract, mesh)
  frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen), mesh)
  step_fn = train_lib.TrainStep(models, mesh, state_sh, frozen_sh)
  state = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), state_sh)
  batch = sharding.shard_host_batch(batch, mesh)
  return step_fn, step_fn(state, batch, jax.random.PRNGKey(0), jax.device_put(frozen, frozen_sh),
                          0 if update == "G" else 1)


def test_sharded_step_matches_single_device(setup):
  models, frozen, state, batch = setup
  mesh8 = sharding.make_mesh({"data": 4, "fsdp": 2})
  mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  _, (s8, m8, u8) = _step_on(mesh8, models, frozen, state, batch, "G")
  _, (s1, m1, u1) = _step_on(mesh1, models, frozen, state, batch, "G")
  assert u8 == u1 == train_lib.Update.GENERATOR
  assert set(m8) == set(m1) and "loss/reg_decoder" in m8
  for key in ("loss/total", "loss/nll", "loss/kl", "loss/reg_decoder"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(m8["grad_norm/generator"], m1["grad_norm/generator"], rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(s8.params), jax.tree_util.tree_leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(s8.opt_state), jax.tree_util.tree_leaves(s1.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  # The step did update the optimizer (the lr of the very first warm-up step is 0, so params stay).
  mu = s8.opt_state[1][0].mu["vae"]["decoder"]["conv_out"]["kernel"]
  assert float(jnp.max(jnp.abs(mu))) > 0 and float(m8["grad_norm/generator"]) > 0
  assert int(s8.step) == 1 and float(m8["guard/finite"]) == 1.0


def test_nan_batch_is_skipped_and_counted(setup):
  models, frozen, state, batch = setup
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  bad = {"video": np.asarray(batch["video"]).copy()}
  bad["video"][0, 0, 0, 0, 0] = np.nan
  _, (new, metrics, _) = _step_on(mesh, models, frozen, state, bad, "G")
  assert float(metrics["guard/finite"]) == 0.0 and int(new.nan_skips) == 1 and int(new.nan_streak) == 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                  jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(new.step) == 1


def test_disc_start_switches_the_gan_on_without_recompiling(setup):
  models, frozen, state, batch = setup
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  step_fn, (s1, m_before, _) = _step_on(mesh, models, frozen, state, batch, "G")
  assert float(m_before["scalars/disc_factor"]) == 0.0 and float(m_before["scalars/d_weight"]) == 0.0
  later = s1.replace(step=jnp.asarray(models.weights.disc_start, jnp.int32))   # a G step at disc_start
  g_fn = step_fn._fns[train_lib.Update.GENERATOR]
  compiles = g_fn._cache_size()
  _, m_after = g_fn(later, sharding.shard_host_batch(batch, mesh), jax.random.PRNGKey(0), frozen)
  assert g_fn._cache_size() == compiles
  assert float(m_after["scalars/disc_factor"]) == 1.0 and float(m_after["scalars/d_weight"]) > 0.0


def test_update_alternation():
  assert [train_lib.update_for_step(s, True).value for s in range(4)] == [
      "generator", "discriminator", "generator", "discriminator"]
  assert train_lib.update_for_step(3, False) is train_lib.Update.BOTH


def _final_params(workdir):
  _, params = cvvae_jax.load_pretrained(workdir)
  return params


def test_resume_gives_identical_losses_and_params(image_vae_dir, tmp_path):
  straight = train_lib.train_and_evaluate(tiny_config(image_vae_dir, num_steps=4), str(tmp_path / "a"))
  train_lib.train_and_evaluate(tiny_config(image_vae_dir, num_steps=2), str(tmp_path / "b"))
  resumed = train_lib.train_and_evaluate(tiny_config(image_vae_dir, num_steps=4), str(tmp_path / "b"))
  assert int(straight.step) == int(resumed.step) == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight.params, resumed.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight.disc_opt_state, resumed.disc_opt_state)
  with open(tmp_path / "a" / "history.json") as f:
    a = json.load(f)
  with open(tmp_path / "b" / "history.json") as f:
    b = json.load(f)
  for key in ("loss/total", "disc/loss"):
    assert dict(a[key])[4 if key == "disc/loss" else 3] == dict(b[key])[4 if key == "disc/loss" else 3], key
  # The workdir loads as a model, and its export to the PyTorch layout loads back.
  params = _final_params(str(tmp_path / "a"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, straight.params["vae"])
  assert os.path.isfile(tmp_path / "a" / "loss_curves.png")


def test_config_errors_name_the_field(image_vae_dir, tmp_path):
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.data.streams.video.frames = 4
  with pytest.raises(ValueError, match=r"config.data.streams.video.frames=4: expected 1 \+ 4k frames"):
    train_lib.train_and_evaluate(c, str(tmp_path / "x"))
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.data.streams.video.batch_size = 6
  with pytest.raises(ValueError, match=r"config.data.streams.video.batch_size=6 must be divisible"):
    train_lib.train_and_evaluate(c, str(tmp_path / "y"))
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.mesh.data = 16
  with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp = 16 but 8 devices"):
    train_lib.train_and_evaluate(c, str(tmp_path / "z"))
