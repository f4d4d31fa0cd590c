"""The generator objective with LPIPS on a random subset of each clip's frames (`loss.perceptual_frames`): LPIPS on
B*k frames instead of B*T, seen in the lowered program's FLOPs (lowered only: compiling and running the tiny
objective twice took ~7 min on the loaded 2 cores; the estimator's numbers are tested in test_losses.py)."""
import functools

import jax
import jax.numpy as jnp
import pytest

from cvvae_jax.train import build, objectives
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
