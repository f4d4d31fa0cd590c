"""Every rematerialization policy computes the same objectives and gradients as none (it only changes what the
backward pass keeps), for the whole generator objective: VAE, LPIPS, the frozen image decoder, the GAN term."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models import remat as remat_lib
from cvvae_jax.train import build, objectives
from cvvae_jax.train.state import init_state
from tests import helpers
from tests.train.test_train import image_vae_dir, tiny_config  # noqa: F401  (a fixture)


def _objectives(image_vae_dir, policy):  # noqa: F811
  config = tiny_config(image_vae_dir)
  with config.unlocked():
    config.loss.perceptual_weight = 0.5  # LPIPS on: its frames are recomputed one at a time under `full`
    config.loss.disc_start = 0           # the GAN term and its adaptive weight (a second backward) are on
    config.train.remat = policy
  image_vae, frozen = build.load_frozen(config, "cvvae")
  models = build.build_models(config, image_vae)
  state = jax.jit(functools.partial(init_state, models))(jax.random.PRNGKey(0))
  x = helpers.tiny_input((2, 5, 16, 16, 3), seed=3)
  rng, step = jax.random.PRNGKey(1), jnp.asarray(5)
  g = jax.jit(jax.value_and_grad(
      lambda p: objectives.generator_objective(p, state.disc_params, frozen, x, rng, step, models), has_aux=True))
  d = jax.jit(jax.value_and_grad(
      lambda p: objectives.discriminator_objective(p, state.params["vae"], x, rng, step, models), has_aux=True))
  return g(state.params), d(state.disc_params)


@pytest.fixture(scope="module")
def reference(image_vae_dir):  # noqa: F811
  return _objectives(image_vae_dir, "none")


def _assert_close_to_scale(got, want, rtol):
  """As tests/train/test_train.py: relative to the largest entry of the tree (biases feeding a GroupNorm have
  gradients that are zero up to float noise)."""
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree_util.tree_leaves(want))
  assert diff <= rtol * scale, (diff, scale)


# `full` covers every part (the others are subsets or the same units with another policy): the default suite
# checks it; CI's slow run checks the rest.
@pytest.mark.parametrize("policy", [pytest.param(p, marks=[] if p == "full" else [pytest.mark.slow])
                                    for p in remat_lib.POLICIES if p != "none"])
def test_every_remat_policy_gives_the_losses_and_gradients_of_none(image_vae_dir, reference, policy):  # noqa: F811
  (g_ref, d_ref) = reference
  (g, d) = _objectives(image_vae_dir, policy)
  for (value, aux, grads), (value_ref, aux_ref, grads_ref) in (((*g[0], g[1]), (*g_ref[0], g_ref[1])),
                                                               ((*d[0], d[1]), (*d_ref[0], d_ref[1]))):
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for key in aux_ref:
      # The adaptive weight is a ratio of two gradient norms, the GAN one ~300x the smaller: its float noise (and
      # the weighted GAN term's) reaches 1.1e-5 relative when XLA fuses the backward differently (below).
      rtol = 1e-4 if key in ("scalars/d_weight", "weighted/g") else 1e-5
      np.testing.assert_allclose(aux[key], aux_ref[key], rtol=rtol, atol=1e-7, err_msg=key)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_ref)
    # 2.5e-4 measured under `full`: XLA:CPU's YNN fusions (jaxlib 0.10's default) fuse some convolutions of the
    # ordered backward (`remat._after`) and round differently; with `--xla_cpu_experimental_ynn_fusion_type=` the
    # same programs agree to 1.1e-5. A unit's gradient lost or doubled is an error of order 1.
    _assert_close_to_scale(grads, grads_ref, 1e-3)
  assert float(g_ref[0][1]["rec/perceptual"]) > 0 and "loss/reg_decoder" in g_ref[0][1]


def test_remat_policy_names():
  assert remat_lib.policy_name(True) == "blocks" and remat_lib.policy_name(False) == "none"
  assert remat_lib.covers("full", "loss") and not remat_lib.covers("blocks", "loss")
  with pytest.raises(ValueError, match="unknown remat policy 'everything'; expected one of"):
    remat_lib.policy_name("everything")


def test_checkpointed_map_equals_one_call_and_checks_the_chunk():
  x = jnp.arange(24.0).reshape(6, 4)
  fn = lambda a: jnp.sin(a) * a.sum(axis=1, keepdims=True)
  for chunk in (1, 2, 3, 6, 0):
    np.testing.assert_allclose(remat_lib.checkpointed_map(fn, "full", x, chunk=chunk), fn(x), rtol=1e-6)
    g = jax.grad(lambda v: remat_lib.checkpointed_map(fn, "full", v, chunk=chunk).sum())(x)
    np.testing.assert_allclose(g, jax.grad(lambda v: fn(v).sum())(x), rtol=1e-5)
  with pytest.raises(ValueError, match=r"expected a chunk dividing the leading axis 6 \(or 0\), got 4"):
    remat_lib.checkpointed_map(fn, "full", x, chunk=4)
