"""Mesh, rule-based param/state shardings and batch sharding on 8 fake CPU devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from cvvae_jax.train import config as train_config
from cvvae_jax.train import sharding


def _need_8_devices():
  if jax.device_count() != 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py sets XLA_FLAGS), got {jax.device_count()}")


@pytest.mark.parametrize("data,fsdp,expected", [(-1, 1, (8, 1)), (4, 2, (4, 2)), (2, 4, (2, 4)),
                                                (-1, 4, (2, 4)), (2, -1, (2, 4)), (1, 8, (1, 8))])
def test_make_mesh_shapes(data, fsdp, expected):
  _need_8_devices()
  cfg = train_config.mesh_section()
  cfg.data, cfg.fsdp = data, fsdp
  mesh = sharding.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "spatial")
  assert tuple(mesh.shape.values()) == (*expected, 1)  # mesh.spatial defaults to 1
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_section_defaults():
  cfg = train_config.mesh_section()
  assert (cfg.data, cfg.fsdp, cfg.spatial) == (-1, 1, 1)


@pytest.mark.parametrize("data,fsdp,message", [
    (16, 1, "mesh.data * mesh.fsdp = 16 but 8 devices are available"),
    (2, 2, "mesh.data * mesh.fsdp = 4 but 8 devices are available"),
    (-1, 3, "mesh.fsdp = 3 does not divide the 8 available devices"),
    (-1, -1, "at most one mesh axis may be -1"),
    (0, 8, "expected mesh.data to be a positive int or -1, got 0"),
])
def test_make_mesh_errors_name_the_field(data, fsdp, message):
  _need_8_devices()
  with pytest.raises(ValueError, match=message.replace("*", r"\*")):
    sharding.make_mesh({"data": data, "fsdp": fsdp})


def test_make_mesh_missing_field():
  with pytest.raises(ValueError, match="expected field mesh.fsdp"):
    sharding.make_mesh({"data": -1})


def _abstract_params():
  f32 = jnp.float32
  return {
      "encoder": {
          "conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 8, 256), f32),  # last dim largest
                      "bias": jax.ShapeDtypeStruct((256,), f32)},
          "proj": {"kernel": jax.ShapeDtypeStruct((512, 96), f32)},  # first dim largest
          "odd": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 129, 255), f32)},  # nothing divisible by 4
          "tiny": {"kernel": jax.ShapeDtypeStruct((8, 8), f32)},  # divisible but below min size
          "norm_out": {"scale": jax.ShapeDtypeStruct((256,), f32),
                       "extra": jax.ShapeDtypeStruct((1024, 64), f32)},  # inside a norm: replicated
          "square": {"kernel": jax.ShapeDtypeStruct((128, 128), f32)},  # tie -> last dim
      },
  }


def test_param_partition_specs_follow_rules():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  shardings = sharding.param_shardings(_abstract_params(), mesh, min_fsdp_size=1024)
  enc = jax.tree.map(lambda s: s.spec, shardings["encoder"], is_leaf=lambda x: isinstance(x, NamedSharding))
  assert enc["conv_in"]["kernel"] == P(None, None, None, None, "fsdp")
  assert enc["conv_in"]["bias"] == P()
  assert enc["proj"]["kernel"] == P("fsdp", None)
  assert enc["odd"]["kernel"] == P()
  assert enc["tiny"]["kernel"] == P()
  assert enc["norm_out"]["scale"] == P()
  assert enc["norm_out"]["extra"] == P()
  assert enc["square"]["kernel"] == P(None, "fsdp")
  assert all(s.mesh is mesh for s in jax.tree.leaves(shardings))
  # The default minimum size is 2**14 elements: a leaf of exactly that size is sharded, one less is not.
  default = sharding.param_shardings(_abstract_params(), mesh)
  assert default["encoder"]["proj"]["kernel"].spec == P("fsdp", None)
  assert default["encoder"]["square"]["kernel"].spec == P(None, "fsdp")
  assert sharding.partition_spec((128, 128), sharding.Policy.FSDP, 4, 2**14 + 1) == P()


def test_spatial_axis_splits_the_parameters_too():
  """With a height split the devices of a spatial group split the parameters as FSDP's do: over `fsdp x spatial`
  (here 2 x 2 = 4 devices); without one the specs are exactly those of before the spatial axis."""
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "spatial": 2})
  assert sharding.param_axes(mesh) == ("fsdp", "spatial")
  specs = sharding.partition_specs(_abstract_params(), mesh, min_fsdp_size=1024)["encoder"]
  assert specs["conv_in"]["kernel"] == P(None, None, None, None, ("fsdp", "spatial"))
  assert specs["proj"]["kernel"] == P(("fsdp", "spatial"), None)
  assert specs["odd"]["kernel"] == P()  # 129, 255: neither divisible by 4
  assert specs["norm_out"]["extra"] == P()
  only_spatial = sharding.make_mesh({"data": 2, "fsdp": 1, "spatial": 4})
  assert sharding.partition_specs(_abstract_params(), only_spatial, min_fsdp_size=1024)["encoder"]["square"][
      "kernel"] == P(None, ("fsdp", "spatial"))
  no_split = sharding.make_mesh({"data": 2, "fsdp": 4, "spatial": 1})
  assert sharding.param_axes(no_split) == "fsdp"
  assert sharding.partition_specs(_abstract_params(), no_split, min_fsdp_size=1024)["encoder"]["conv_in"][
      "kernel"] == P(None, None, None, None, "fsdp")


def test_fsdp_1_replicates_everything():
  _need_8_devices()
  mesh = sharding.make_mesh(train_config.mesh_section())
  specs = sharding.partition_specs(_abstract_params(), mesh, min_fsdp_size=0)
  assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_custom_rules_and_bad_rules():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  rules = sharding.parse_rules([(r"proj/", "replicate"), (r".*", "fsdp")])
  shardings = sharding.param_shardings(_abstract_params(), mesh, rules, min_fsdp_size=0)
  assert shardings["encoder"]["proj"]["kernel"].spec == P()
  assert shardings["encoder"]["conv_in"]["bias"].spec == P("fsdp")  # no bias rule here
  with pytest.raises(ValueError, match=r"sharding rule 1 \('x'\): expected a policy in \['fsdp', 'replicate'\]"):
    sharding.parse_rules([(".*", "fsdp"), ("x", "shard")])
  with pytest.raises(ValueError, match="sharding rule 0: invalid regex"):
    sharding.parse_rules([("(", "fsdp")])
  # The table form parses to the defaults.
  assert sharding.parse_rules(sharding.DEFAULT_RULE_TABLE) == sharding.DEFAULT_RULES


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema_params: dict
  rng: jax.Array


def _mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {"dense1": {"kernel": jax.random.normal(k1, (16, 64)) * 0.3, "bias": jnp.zeros((64,))},
          "dense2": {"kernel": jax.random.normal(k2, (64, 8)) * 0.3, "bias": jnp.zeros((8,))}}


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  y = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return jnp.mean((y - batch["y"]) ** 2)


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=1e-2))


def _create_state(key):
  params = _mlp_params(key)
  return TrainState(step=jnp.int32(0), params=params, opt_state=TX.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key(1))


def _train_step(state, batch):
  loss, grads = jax.value_and_grad(_loss)(state.params, batch)
  updates, opt_state = TX.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), loss


def test_state_shardings_cover_optimizer_and_scalars():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  abstract = jax.eval_shape(_create_state, jax.random.key(0))
  specs = sharding.partition_specs(abstract, mesh, min_fsdp_size=64)
  assert specs.params["dense1"]["kernel"] == P(None, "fsdp")
  assert specs.params["dense2"]["kernel"] == P("fsdp", None)
  assert specs.ema_params["dense1"]["kernel"] == P(None, "fsdp")
  adam = specs.opt_state[1][0]
  assert adam.count == P()
  assert adam.mu["dense1"]["kernel"] == P(None, "fsdp") and adam.nu["dense2"]["kernel"] == P("fsdp", None)
  assert adam.mu["dense1"]["bias"] == P()
  assert specs.step == P() and specs.rng == P()


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_sharded_train_step_matches_unsharded(mesh_shape):
  _need_8_devices()
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(16, 16)).astype(np.float32), "y": rng.normal(size=(16, 8)).astype(np.float32)}
             for _ in range(3)]
  key = jax.random.key(0)

  # Reference: no shardings, one device.
  ref_state = jax.jit(_create_state)(key)
  ref_step = jax.jit(_train_step)
  ref_losses = []
  for b in batches:
    ref_state, loss = ref_step(ref_state, b)
    ref_losses.append(loss)

  abstract = jax.eval_shape(_create_state, key)
  state_sh = sharding.state_shardings(abstract, mesh, min_fsdp_size=64)
  data_sh = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  state = jax.jit(_create_state, out_shardings=state_sh)(key)
  step = jax.jit(_train_step, in_shardings=(state_sh, {"x": data_sh, "y": data_sh}),
                 out_shardings=(state_sh, replicated), donate_argnums=0)
  sharding.check_batch_divisible(16, mesh, "config.batch_size")
  losses = []
  for b in batches:
    state, loss = step(state, sharding.shard_host_batch(b, mesh))
    losses.append(loss)

  if mesh_shape[1] > 1:
    assert state.params["dense1"]["kernel"].sharding.spec == P(None, "fsdp")
    assert state.opt_state[1][0].mu["dense2"]["kernel"].sharding.spec == P("fsdp", None)
    shard_shape = state.params["dense1"]["kernel"].addressable_shards[0].data.shape
    assert shard_shape == (16, 64 // mesh_shape[1])
  np.testing.assert_allclose(np.array(losses), np.array(ref_losses), atol=1e-6, rtol=1e-6)
  for got, ref in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref_state.params))):
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)
  assert int(state.step) == 3 and int(state.opt_state[1][0].count) == 3
  # Training happened (the check above is not trivially comparing initial params).
  assert not np.allclose(jax.device_get(state.params)["dense1"]["kernel"],
                         jax.device_get(_mlp_params(key))["dense1"]["kernel"], atol=1e-4)


def test_batch_sharding_and_divisibility():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.check_batch_divisible(24, mesh, "config.batch_size") == 24
  with pytest.raises(ValueError,
                     match=r"config.batch_size=12 must be divisible .* mesh.data \* mesh.fsdp = 4 \* 2 = 8"):
    sharding.check_batch_divisible(12, mesh, "config.batch_size")
  with pytest.raises(ValueError, match="expected config.eval_batch_size to be a positive int, got 0"):
    sharding.check_batch_divisible(0, mesh, "config.eval_batch_size")

  video = np.arange(8 * 5 * 4 * 4 * 3, dtype=np.float32).reshape(8, 5, 4, 4, 3)
  batch = sharding.shard_host_batch({"video": video, "label": np.arange(8)}, mesh)
  assert batch["video"].shape == video.shape and batch["video"].sharding == sharding.batch_sharding(mesh)
  assert {s.data.shape for s in batch["video"].addressable_shards} == {(1, 5, 4, 4, 3)}
  np.testing.assert_array_equal(np.asarray(batch["video"]), video)
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(8))
  with pytest.raises(ValueError, match=r"batch\['video'\]: 6 examples .* not divisible by the 8 devices"):
    sharding.shard_host_batch({"video": video[:6]}, mesh)
