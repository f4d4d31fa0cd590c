"""The generator objective with LPIPS on a random subset of each clip's frames (`loss.perceptual_frames`): LPIPS on
B*k frames instead of B*T, seen in the lowered program's FLOPs (lowered only: compiling and running the tiny
objective twice took ~7 min on the loaded 2 cores; the estimator's numbers are tested in test_losses.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.train import build, losses, objectives
from cvvae_jax.train.state import init_state
from tests import helpers
from tests.train.test_train import image_vae_dir, tiny_config  # noqa: F401  (a fixture)


def test_lpips_on_a_frame_subset_in_the_generator_objective(image_vae_dir):  # noqa: F811
  x = helpers.tiny_input((2, 5, 16, 16, 3), seed=3)
  rng, step = jax.random.PRNGKey(1), jnp.asarray(5)
  runs = {}
  for frames in (0, 2):
    config = tiny_config(image_vae_dir)
    with config.unlocked():
      config.loss.perceptual_weight = 0.5
      config.loss.perceptual_frames = frames
    image_vae, frozen = build.load_frozen(config, "cvvae")
    models = build.build_models(config, image_vae)
    state = jax.eval_shape(functools.partial(init_state, models), jax.random.PRNGKey(0))  # shapes only
    g = jax.jit(jax.value_and_grad(
        lambda p, d, m=models, f=frozen: objectives.generator_objective(p, d, f, x, rng, step, m), has_aux=True))
    runs[frames] = float(g.lower(state.params, state.disc_params).cost_analysis()["flops"])
  # LPIPS-VGG is most of the tiny objective's FLOPs: on 2 of 5 frames the step needs well under 90 % of them.
  assert runs[2] < 0.9 * runs[0], runs


@pytest.mark.slow  # compiles and runs the tiny generator objective: ~1 min on 2 cores
def test_the_generator_runs_no_discriminator_before_disc_start(image_vae_dir):  # noqa: F811
  """Before disc_start the GAN term has weight 0 and the step skips D (a cond): a NaN discriminator cannot reach the
  generator's loss or gradients there, and does from disc_start on (where D is evaluated)."""
  config = tiny_config(image_vae_dir)  # disc_start 2, no LPIPS
  image_vae, frozen = build.load_frozen(config, "cvvae")
  models = build.build_models(config, image_vae)
  state = jax.jit(functools.partial(init_state, models))(jax.random.PRNGKey(0))
  nan_disc = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), state.disc_params)
  x, rng = helpers.tiny_input((1, 5, 16, 16, 3), seed=3), jax.random.PRNGKey(1)
  g = jax.jit(jax.value_and_grad(
      lambda p, d, s: objectives.generator_objective(p, d, frozen, x, rng, s, models), has_aux=True))
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(tree))
  (loss, metrics), grads = g(state.params, nan_disc, jnp.asarray(0))
  assert finite(loss) and finite(grads) and float(metrics["loss/g"]) == 0.0
  (loss, _), grads = g(state.params, nan_disc, jnp.asarray(config.loss.disc_start))
  assert not finite(loss)


@pytest.mark.slow  # compiles and runs the tiny generator objective three ways: ~2 min on 2 cores
def test_the_gan_terms_have_the_gradients_of_differentiating_through_the_discriminator(image_vae_dir):  # noqa: F811
  """From disc_start on, the objective evaluates D and the reconstruction loss once with their gradients w.r.t. x_hat
  (`losses.with_gradient`). Its loss and gradients equal those of differentiating through D directly (the pre-GAN
  objective plus d_weight * g(x_hat(params))), and its adaptive weight equals the one from the exact gradients
  w.r.t. the decoder's last kernel."""
  config = tiny_config(image_vae_dir)  # disc_start 2, no LPIPS
  image_vae, frozen = build.load_frozen(config, "cvvae")
  models = build.build_models(config, image_vae)
  state = jax.jit(functools.partial(init_state, models))(jax.random.PRNGKey(0))
  x, rng, d = helpers.tiny_input((1, 5, 16, 16, 3), seed=3), jax.random.PRNGKey(1), state.disc_params
  objective = lambda p, s: objectives.generator_objective(p, d, frozen, x, rng, jnp.asarray(s), models)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)(
      state.params, config.loss.disc_start)
  assert float(metrics["scalars/disc_factor"]) == 1.0 and float(metrics["scalars/d_weight"]) > 0.0

  x_hat_of = lambda p: objectives.reconstruct(models, p["vae"], x, jax.random.split(rng)[0])[0]
  g_of = lambda p: losses.generator_adversarial_loss(models.disc.apply({"params": d}, x_hat_of(p)))
  nll_of = lambda p: losses.reconstruction_nll(x, x_hat_of(p), p["logvar"], None, 0.0)[0]
  c = metrics["scalars/d_weight"]
  reference = lambda p: objective(p, 0)[0] + c * g_of(p)
  want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(state.params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/g"], jax.jit(g_of)(state.params), rtol=1e-6)
  # Summation order through the decoder: measured up to 1.6e-6 of the largest gradient (the gradients of biases
  # before a GroupNorm are 0 up to float noise, so the tolerance is on the scale of all of them).
  scale = max(float(np.max(np.abs(w))) for w in jax.tree_util.tree_leaves(want_grads))
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)

  last = lambda g: g["vae"]["decoder"]["conv_out"]["kernel"]
  grad_nll, grad_g = (last(jax.jit(jax.grad(f))(state.params)) for f in (nll_of, g_of))
  want_weight = losses.adaptive_generator_weight(grad_nll, grad_g, config.loss.disc_weight,
                                                 eps=config.loss.adaptive_weight_eps,
                                                 max_weight=config.loss.adaptive_weight_max)
  np.testing.assert_allclose(c, want_weight, rtol=1e-5)
