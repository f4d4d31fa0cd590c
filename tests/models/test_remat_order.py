"""The recomputed units' backward runs in order (`remat._after`): what a `full` policy saves shows in XLA's memory
analysis, and `remat.frozen` networks compute no parameter gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from cvvae_jax.models import remat as remat_lib
from cvvae_jax.models.discriminator import PatchDiscriminator3D
from cvvae_jax.models.vae3d import CVVAE
from tests import helpers


def _compiled_grad(fn, *args):
  return jax.jit(jax.grad(fn)).lower(*args).compile()


def test_full_remat_holds_well_under_none_in_the_compiled_backward():
  # Without the order kept (only `jax.checkpoint`'s optimization barriers, which XLA:CPU removes before it
  # schedules), this program held 44.8 MiB of temporaries under `full`, as much as without remat: the
  # recomputations were scheduled early and the kernel gradients late. With it: 21.0 MiB.
  x = helpers.tiny_input((1, 5, 32, 32, 3), seed=5)
  temps = {}
  for policy in ("none", "full"):
    vae = CVVAE(block_out_channels=(32, 32, 64, 64), layers_per_block=1, remat=policy, conv_impl="xla",
                upsample_impl="xla")
    params = jax.jit(vae.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1, 8, 8, 3)))["params"]
    loss = lambda p, vae=vae: jnp.mean(jnp.abs(vae.apply({"params": p}, x)[0] - x))
    temps[policy] = _compiled_grad(loss, params).memory_analysis().temp_size_in_bytes
  assert temps["full"] < 0.6 * temps["none"], temps


def test_frozen_policy_computes_no_parameter_gradients():
  # The discriminator in the generator's step: gradients w.r.t. its input only. Under `full` the order makes each
  # block's backward wait for its parameters' gradients (4.9 -> 7.0 GFLOP here); `frozen("full")` does not.
  x = helpers.tiny_input((1, 5, 32, 32, 3), seed=2)
  disc = PatchDiscriminator3D(ndf=32, n_layers=2, remat="full")
  params = jax.jit(disc.init)(jax.random.PRNGKey(0), x)["params"]
  grads, flops = {}, {}
  for name, remat in (("full", "full"), ("frozen", remat_lib.frozen("full"))):
    loss = lambda x, d=disc.clone(remat=remat): jnp.sum(d.apply({"params": params}, x))
    grads[name] = jax.jit(jax.grad(loss))(x)
    flops[name] = _compiled_grad(loss, x).cost_analysis()["flops"]
  np.testing.assert_allclose(grads["frozen"], grads["full"], rtol=1e-5, atol=1e-7)
  assert flops["frozen"] < 0.8 * flops["full"], flops
  assert remat_lib.policy_name(remat_lib.frozen("full")) == "full" and remat_lib.covers(remat_lib.frozen("full"),
                                                                                         "res")
