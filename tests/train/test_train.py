"""The sharded train step and the loop: mesh parity, NaN guard, disc_start without recompiling, exact resume."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cvvae_jax
from configs import cvvae as cvvae_config
from cvvae_jax.train import build, loop, probe, sharding
from cvvae_jax.train import step as step_lib
from cvvae_jax.train.state import init_state
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
    c.train.generator_only_before_gan = False  # G and D alternate from step 0: resume tests cover both optimizers
    c.train.num_steps = num_steps
    c.train.log_every_steps = 1
    c.train.image_every_steps = 1000
    c.train.eval_every_steps = 0
    c.train.checkpoint_every_steps = 2
    c.train.async_checkpoints = False
    c.optim.generator.total_steps = 100
    video = c.data.streams.video
    video.frames, video.size, video.short_side, video.batch_size, video.stride = 5, (16, 16), (16, 20), 8, (1, 2)
    del c.data.streams["frames"]
  return c


@pytest.fixture(scope="module")
def image_vae_dir(tmp_path_factory):
  vae = cvvae_jax.ImageVAE(block_out_channels=CH, layers_per_block=1, latent_channels=4)
  params = jax.jit(vae.init)(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 3)))["params"]
  return cvvae_jax.save_flax(vae, params, str(tmp_path_factory.mktemp("image_vae")))


@pytest.fixture(scope="module")
def setup(image_vae_dir):
  config = tiny_config(image_vae_dir)
  image_vae, frozen = build.load_frozen(config, "cvvae")
  models = build.build_models(config, image_vae)
  state = jax.jit(functools.partial(init_state, models))(jax.random.PRNGKey(0))
  batch = {"video": helpers.tiny_input((8, 5, 16, 16, 3), seed=3)}
  return models, frozen, state, batch


class MeshStep:
  """A TrainStep on `mesh` with the state, batch and frozen params placed for it."""

  def __init__(self, mesh, models, frozen, state):
    self.mesh = mesh
    self.state_sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
    frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen), mesh)
    self.step_fn = step_lib.TrainStep(models, mesh, self.state_sh, frozen_sh)
    self.frozen = jax.device_put(frozen, frozen_sh)

  def __call__(self, state, batch, host_step=0):
    state = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), self.state_sh)
    return self.step_fn(state, sharding.shard_host_batch(batch, self.mesh), jax.random.PRNGKey(0), self.frozen,
                        host_step)


@pytest.fixture(scope="module")
def single_device_step(setup):
  models, frozen, state, _ = setup
  return MeshStep(sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1]), models, frozen, state)


def _assert_close_to_scale(got, want, rtol):
  """max |got - want| over the whole tree <= rtol * max |want| (some gradients, e.g. of conv biases feeding a
  GroupNorm, are zero up to float noise, so per-tensor relative checks would compare noise)."""
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree_util.tree_leaves(want))
  assert diff <= rtol * scale, (diff, scale)


def test_sharded_step_matches_single_device(setup, single_device_step):
  models, frozen, state, batch = setup
  mesh8 = sharding.make_mesh({"data": 4, "fsdp": 2})
  s8, m8, u8 = MeshStep(mesh8, models, frozen, state)(state, batch)
  s1, m1, u1 = single_device_step(state, batch)
  assert u8 == u1 == step_lib.Update.GENERATOR
  assert set(m8) == set(m1) and "loss/reg_decoder" in m8
  for key in ("loss/total", "loss/nll", "loss/kl", "loss/reg_decoder"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(m8["grad_norm/generator"], m1["grad_norm/generator"], rtol=1e-4)
  # Sharded reductions sum in another order: equal to float tolerance, relative to each tensor's scale.
  _assert_close_to_scale(s8.params, s1.params, 1e-5)
  _assert_close_to_scale(s8.opt_state[1][0].mu, s1.opt_state[1][0].mu, 1e-4)   # Adam's first moments
  _assert_close_to_scale(s8.opt_state[1][0].nu, s1.opt_state[1][0].nu, 1e-4)   # and second moments
  # The step did update the optimizer (the lr of the very first warm-up step is 0, so params stay).
  mu = s8.opt_state[1][0].mu["vae"]["decoder"]["conv_out"]["kernel"]
  assert float(jnp.max(jnp.abs(mu))) > 0 and float(m8["grad_norm/generator"]) > 0
  assert int(s8.step) == 1 and float(m8["guard/finite"]) == 1.0


def test_nan_batch_is_skipped_and_counted(setup, single_device_step):
  models, frozen, state, batch = setup
  bad = {"video": np.asarray(batch["video"]).copy()}
  bad["video"][0, 0, 0, 0, 0] = np.nan
  new, metrics, _ = single_device_step(state, bad)
  assert float(metrics["guard/finite"]) == 0.0 and int(new.nan_skips) == 1 and int(new.nan_streak) == 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                  jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(new.step) == 1


def test_disc_start_switches_the_gan_on_without_recompiling(setup, single_device_step):
  models, frozen, state, batch = setup
  s1, m_before, _ = single_device_step(state, batch)
  assert float(m_before["scalars/disc_factor"]) == 0.0 and float(m_before["scalars/d_weight"]) == 0.0
  g_fn = single_device_step.step_fn._fns[step_lib.Update.GENERATOR]
  compiles = g_fn._cache_size()
  later = s1.replace(step=jax.device_put(jnp.asarray(models.weights.disc_start, jnp.int32), s1.step.sharding))
  _, m_after, _ = single_device_step(later, batch)   # a generator step at disc_start
  assert g_fn._cache_size() == compiles
  assert float(m_after["scalars/disc_factor"]) == 1.0 and float(m_after["scalars/d_weight"]) > 0.0


def test_update_alternation():
  assert [step_lib.update_for_step(s, True).value for s in range(4)] == [
      "generator", "discriminator", "generator", "discriminator"]
  assert step_lib.update_for_step(3, False) is step_lib.Update.BOTH
  # generator_only_steps: G alone before the GAN starts, then the alternation (or both) as before
  assert [step_lib.update_for_step(s, True, 3).value[0] for s in range(7)] == list("gggdgdg")
  assert [step_lib.update_for_step(s, False, 2).value[0] for s in range(4)] == list("ggbb")


def _final_params(workdir):
  _, params = cvvae_jax.load_pretrained(workdir)
  return params


def test_generator_only_before_gan_in_the_loop(image_vae_dir, tmp_path):
  c = tiny_config(image_vae_dir, num_steps=4)
  with c.unlocked():
    c.train.generator_only_before_gan, c.train.checkpoint_every_steps = True, 1000
  state = loop.train_and_evaluate(c, str(tmp_path / "w"))
  with open(tmp_path / "w" / "history.json") as f:
    history = json.load(f)
  # steps 0, 1 (before disc_start 2) and 2 update G, step 3 updates D; the history is keyed by steps done
  assert [s for s, _ in history["loss/total"]] == [1, 2, 3] and [s for s, _ in history["disc/loss"]] == [4]
  # each optimizer counted its own updates (their lrs follow from the counts: optim.step_of_update, test_optim.py)
  def adam_count(opt_state):
    found = [s.count for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return int(found[0])
  assert int(state.step) == 4 and adam_count(state.opt_state) == 3 and adam_count(state.disc_opt_state) == 1


@pytest.mark.slow  # four short training runs (~4 min on 2 cores)
def test_resume_gives_identical_losses_and_params(image_vae_dir, tmp_path):
  straight = loop.train_and_evaluate(tiny_config(image_vae_dir, num_steps=3), str(tmp_path / "a"))
  loop.train_and_evaluate(tiny_config(image_vae_dir, num_steps=2), str(tmp_path / "b"))
  resumed = loop.train_and_evaluate(tiny_config(image_vae_dir, num_steps=3), str(tmp_path / "b"))
  assert int(straight.step) == int(resumed.step) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight.params, resumed.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight.disc_opt_state, resumed.disc_opt_state)
  with open(tmp_path / "a" / "history.json") as f:
    a = json.load(f)
  with open(tmp_path / "b" / "history.json") as f:
    b = json.load(f)
  # Step 3 (a generator update) ran after the resume in b: its losses are bit-identical to a's.
  for key in ("loss/total", "loss/nll", "loss/reg_decoder"):
    assert dict(a[key])[3] == dict(b[key])[3], key
  # b's history survived the resume: steps 1..3 once each, the losses of a's (perf/* are timings).
  assert {k: v for k, v in b.items() if not k.startswith("perf/")} == {k: v for k, v in a.items()
                                                                        if not k.startswith("perf/")}
  assert [s for s, _ in b["perf/steps_per_s"]] == [1, 2, 3]
  # The workdir loads as a model, and its export to the PyTorch layout loads back.
  params = _final_params(str(tmp_path / "a"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, straight.params["vae"])
  assert os.path.isfile(tmp_path / "a" / "loss_curves.png")


def test_config_errors_name_the_field(image_vae_dir, tmp_path):
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.data.streams.video.frames = 4
  with pytest.raises(ValueError, match=r"config.data.streams.video.frames=4: expected 1 \+ 4k frames"):
    loop.train_and_evaluate(c, str(tmp_path / "x"))
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.data.streams.video.batch_size = 6
  with pytest.raises(ValueError, match=r"config.data.streams.video.batch_size=6 must be divisible"):
    loop.train_and_evaluate(c, str(tmp_path / "y"))
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.mesh.data = 16
  with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp = 16 but 8 devices"):
    loop.train_and_evaluate(c, str(tmp_path / "z"))
  c = tiny_config(image_vae_dir)
  with c.unlocked():  # an image stream of 8 images: 1 per device on the default 8-device mesh
    c.data.streams.video.frames = 1
    c.train.image_micro_batch = 2
  with pytest.raises(ValueError, match=r"config.train.image_micro_batch=2 must divide the images per device"):
    loop.train_and_evaluate(c, str(tmp_path / "w"))


def test_probe_metrics_hand_values():
  video = np.zeros((2, 5, 2, 2, 3), np.float32)
  x_hat = video + 0.5          # L1 0.5, MSE 0.25: PSNR 10 log10(4 / 0.25) = 12.04 dB
  decoded = np.zeros((2, 2, 2, 2, 3), np.float32)
  decoded[:, 1] = 1.0          # latent 1 vs frame 4: L1 1 (latent 0 vs frame 0: 0) -> mean 0.5, MSE 0.5
  m = probe.probe_metrics(video, x_hat, decoded, temporal_compression=4)
  np.testing.assert_allclose([m["val/rec_l1"], m["val/psnr"], m["val/reg_l1"], m["val/reg_psnr"]],
                             [0.5, 10 * np.log10(16), 0.5, 10 * np.log10(8)], rtol=1e-6)
  assert set(probe.probe_metrics(video, x_hat, None)) == {"val/rec_l1", "val/psnr"}


@pytest.mark.slow  # two short training runs with probes (~2 min on 2 cores)
def test_probe_runs_at_start_every_n_steps_and_at_the_end(image_vae_dir, tmp_path):
  c = tiny_config(image_vae_dir, num_steps=3)
  with c.unlocked():
    c.train.eval_every_steps, c.train.eval_batches = 2, 2
    ev = c.data.eval
    ev.frames, ev.size, ev.short_side, ev.batch_size = 5, (16, 16), 16, 2
  loop.train_and_evaluate(c, str(tmp_path / "w"))
  with open(tmp_path / "w" / "history.json") as f:
    history = json.load(f)
  for key in ("val/rec_l1", "val/psnr", "val/reg_l1", "val/reg_psnr"):
    assert [s for s, _ in history[key]] == [0, 2, 3], key
    assert all(np.isfinite(v) for _, v in history[key])
  with c.unlocked():
    c.data.eval.batch_size = 64
  with pytest.raises(ValueError, match=r"fewer than config.data.eval.batch_size=64"):
    loop.train_and_evaluate(c, str(tmp_path / "x"))
