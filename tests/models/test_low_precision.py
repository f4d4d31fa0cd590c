"""bf16 compute: GroupNorm and the XLA convolution keep float32 results and float32-exact backward arithmetic, but
their backward passes hold no float32 copies of full-size activations (`layers.group_norm_low_precision`,
`conv_ops._conv_low_precision_backward`); float32 compute is untouched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cvvae_jax.models import conv_ops, layers
from tests.helpers import conv_arrays

ZEROS, REPLICATE = layers.Pad.ZEROS, layers.Pad.REPLICATE


def _norm_and_params(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  return layers.GroupNorm(8, 1e-5), {"params": {"scale": scale, "bias": bias}}, x


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 32), (2, 6, 6, 16)])
def test_group_norm_custom_backward_equals_autodiff(shape):
  """The hand-written backward, fed float32, against JAX's differentiation of the float32 GroupNorm."""
  norm, variables, x = _norm_and_params(shape)
  ct = jax.random.normal(jax.random.PRNGKey(1), shape)
  p = variables["params"]
  ref = jax.jit(jax.grad(lambda x, s, b: jnp.sum(norm.apply({"params": {"scale": s, "bias": b}}, x) * ct),
                         (0, 1, 2)))(x, p["scale"], p["bias"])
  got = jax.jit(jax.grad(lambda x, s, b: jnp.sum(layers.group_norm_low_precision(x, s, b, 8, 1e-5) * ct),
                         (0, 1, 2)))(x, p["scale"], p["bias"])
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_group_norm_bf16_forward_is_the_float32_formula_rounded_once():
  norm, variables, x = _norm_and_params((1, 3, 8, 8, 32), seed=2)
  xb = x.astype(jnp.bfloat16)
  got = norm.apply(variables, xb)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, norm.apply(variables, xb.astype(jnp.float32)).astype(jnp.bfloat16))


def _conv_dtypes(fn, *args):
  """Input dtypes of every convolution in the jaxpr of `fn(*args)`."""
  found = []
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive is lax.conv_general_dilated_p:
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("kernel_shape,strides,padding", [
    ((3, 3, 3, 8, 16), None, ((2, 0, REPLICATE), (1, 1, ZEROS), (1, 1, ZEROS))),
    ((3, 3, 3, 8, 8), (2, 2, 2), ((2, 0, ZEROS), (0, 1, ZEROS), (0, 1, ZEROS))),
    ((1, 1, 1, 8, 16), None, None)])
def test_bf16_conv_backward_runs_in_bf16_and_matches_autodiff(kernel_shape, strides, padding):
  x, kernel, bias = conv_arrays((1, 5, 8, 8, 8), kernel_shape, seed=4)
  x = x.astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(
      lambda: conv_ops.conv_apply(x, kernel, bias, strides=strides, padding=padding, dtype=jnp.bfloat16,
                                  impl="xla")).shape).astype(jnp.bfloat16)
  def loss(conv):
    return lambda x, k: jnp.sum((conv(x, k) * ct).astype(jnp.float32))
  ours = lambda x, k: conv_ops.conv_apply(x, k, bias, strides=strides, padding=padding, dtype=jnp.bfloat16,
                                          impl="xla")
  def jax_default(x, k):  # the float32-result convolution differentiated by JAX (float32 backward)
    rank = 3
    pads = padding or ((0, 0, ZEROS),) * rank
    edge = [(0, 0)] + [(lo, hi) if m is REPLICATE else (0, 0) for lo, hi, m in pads] + [(0, 0)]
    x = jnp.pad(x, edge, mode="edge")
    y = lax.conv_general_dilated(x, k.astype(jnp.bfloat16), strides or (1,) * rank,
                                 [(lo, hi) if m is ZEROS else (0, 0) for lo, hi, m in pads],
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=jnp.float32)
    return (y + bias).astype(jnp.bfloat16)
  np.testing.assert_array_equal(ours(x, kernel), jax_default(x, kernel))
  got = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
  ref = jax.jit(jax.grad(loss(jax_default), (0, 1)))(x, kernel)
  # The input gradient: the same products summed in float32, rounded to bf16 once either way.
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32), rtol=1e-2,
                             atol=1e-2 * float(jnp.max(jnp.abs(ref[0].astype(jnp.float32)))))
  # The kernel gradient: accumulated in float32, rounded once to bf16 (JAX's: kept in float32).
  np.testing.assert_allclose(got[1], ref[1], rtol=2 ** -7, atol=2 ** -7 * float(jnp.max(jnp.abs(ref[1]))))
  conv_inputs = _conv_dtypes(jax.grad(loss(ours), (0, 1)), x, kernel)
  assert len(conv_inputs) >= 3 and all(d == ("bfloat16", "bfloat16") for d in conv_inputs), conv_inputs
  assert any(d == ("float32", "float32") for d in _conv_dtypes(jax.grad(loss(jax_default), (0, 1)), x, kernel))


def test_float32_conv_is_differentiated_by_jax():
  x, kernel, bias = conv_arrays((1, 3, 6, 6, 4), (3, 3, 3, 4, 4), seed=5)
  fn = lambda x, k: jnp.sum(conv_ops.conv_apply(x, k, bias, padding=((1, 1, ZEROS),) * 3, impl="xla"))
  assert all(d == ("float32", "float32") for d in _conv_dtypes(jax.grad(fn, (0, 1)), x, kernel))
