"""Orbax checkpoints of training state: round trip, keep-N, async, resharding, crash safety, preemption flag,
and loading the VAE out of a training workdir."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import struct, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import cvvae_jax
from cvvae_jax.models import registry
from cvvae_jax.train import checkpoint, sharding
from cvvae_jax.train import config as train_config
from cvvae_jax.weights import convert
from cvvae_jax.weights import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema_params: dict
  rng: jax.Array
  raw_rng: jax.Array


TX = optax.adamw(1e-3)


def _state(seed: int = 0, step: int = 0, big: int = 0) -> TrainState:
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"vae": {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 3, 8, 16)), "bias": jnp.arange(16.0)}},
            "disc": {"dense": {"kernel": jax.random.normal(k[1], (16, 32)).astype(jnp.bfloat16)}}}
  if big:
    params["vae"]["big"] = jax.random.normal(k[3], (big,))
  opt_state = TX.init(params)
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)  # non-trivial moments
  return TrainState(step=jnp.int32(step), params=params, opt_state=opt_state,
                    ema_params=jax.tree.map(lambda x: x * 0.5, params), rng=k[2],
                    raw_rng=jax.random.PRNGKey(seed + 7))


def _host(tree):
  """Leaves as numpy (typed keys as their key data), for bit comparisons."""
  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(leaf, tree)


def _assert_bit_identical(got, ref):
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(_host(got))
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(_host(ref))
  assert got_def == ref_def
  for (path, g), (_, r) in zip(got_leaves, ref_leaves):
    assert g.dtype == r.dtype and g.shape == r.shape, (jax.tree_util.keystr(path), g.dtype, r.dtype)
    assert g.tobytes() == r.tobytes(), jax.tree_util.keystr(path)


def _abstract(state, mesh=None, **kw):
  abstract = jax.eval_shape(lambda: state)
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
  else:
    shardings = sharding.state_shardings(abstract, mesh, **kw)
  return sharding.with_shardings(abstract, shardings)


def _meta(step=0):
  config = ml_collections.ConfigDict(dict(lr=1e-4, mesh=dict(data=-1, fsdp=1), dtype=jnp.bfloat16))
  return checkpoint.make_meta(config=config, data_state={"step": step, "epoch": 0}, note="test")


def _manager(workdir, **kw):
  kw.setdefault("enable_async_checkpointing", False)
  return checkpoint.CheckpointManager(workdir, **kw)


def test_round_trip_bit_identical(tmp_path):
  state = _state(seed=1, step=7)
  with _manager(tmp_path) as ckpt:
    assert ckpt.latest_step() is None and ckpt.restore_latest(_abstract(state)) is None
    assert ckpt.save(7, state, _meta(7))
    assert ckpt.latest_step() == 7
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "7"))
  with _manager(tmp_path) as ckpt:  # a fresh process would see the same
    restored, meta = ckpt.restore_latest(_abstract(state))
  assert isinstance(restored, TrainState)
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
  _assert_bit_identical(restored, state)
  assert restored.params["disc"]["dense"]["kernel"].dtype == jnp.bfloat16
  assert meta["data"] == {"step": 7, "epoch": 0} and meta["note"] == "test"
  assert meta["config"]["lr"] == 1e-4 and meta["config"]["mesh"] == {"data": -1, "fsdp": 1}
  assert meta["versions"]["jax"] == jax.__version__ and "orbax-checkpoint" in meta["versions"]
  # Same key stream after restore.
  assert np.array_equal(jax.random.key_data(jax.random.split(restored.rng)),
                        jax.random.key_data(jax.random.split(state.rng)))


def test_restore_needs_shardings_and_json_meta(tmp_path):
  state = _state()
  with _manager(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="expected meta to be JSON-serializable"):
      ckpt.save(1, state, {"bad": jnp.zeros(2)})
    assert ckpt.latest_step() is None
    ckpt.save(1, state, {})
    no_shardings = jax.eval_shape(lambda: state)
    with pytest.raises(ValueError, match=r"expected every leaf of abstract_state .* with a .sharding"):
      ckpt.restore_latest(no_shardings)
    # Strict structure: a state without the EMA params (or with an extra leaf) does not restore.
    abstract = _abstract(state)
    with pytest.raises(ValueError, match="tree structures do not match"):
      ckpt.restore_latest(abstract.replace(ema_params={}))


def test_interval_and_keep_n(tmp_path):
  state = _state()
  with _manager(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
    saved = [s for s in range(1, 10) if ckpt.save(s, state.replace(step=jnp.int32(s)), _meta(s))]
    assert saved == [2, 4, 6, 8]
    assert ckpt.all_steps() == [6, 8]
    assert ckpt.save(9, state.replace(step=jnp.int32(9)), _meta(9), force=True)  # e.g. the last step
    assert not ckpt.save(9, state, _meta(9), force=True)  # already saved: nothing to do
    assert ckpt.all_steps() == [8, 9]
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["8", "9"]
  with _manager(tmp_path) as ckpt:
    restored, meta = ckpt.restore_latest(_abstract(state))
  assert int(restored.step) == 9 and meta["data"]["step"] == 9
  with pytest.raises(ValueError, match="expected checkpoint.max_to_keep >= 1"):
    _manager(tmp_path, max_to_keep=0)


def test_config_defaults_build_a_manager(tmp_path):
  cfg = train_config.train_section("full")
  assert cfg.async_checkpoints and cfg.keep_checkpoints == 3 and cfg.checkpoint_every_steps == 2000
  with checkpoint.CheckpointManager.from_config(tmp_path, cfg) as ckpt:
    assert not ckpt.should_save(1999) and ckpt.should_save(2000)


def test_async_save_then_restore(tmp_path):
  state = _state(seed=2, big=1 << 20)
  ckpt = checkpoint.CheckpointManager(tmp_path, enable_async_checkpointing=True, max_to_keep=2)
  assert ckpt.save(1, state, _meta(1))
  # The arrays were copied to host before save returned: training may now overwrite (donate) them.
  for leaf in jax.tree.leaves(state):
    leaf.delete()
  assert ckpt.save(2, _state(seed=3, big=1 << 20), _meta(2))  # waits for step 1, then writes step 2
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [1, 2]
  restored, meta = ckpt.restore(1, _abstract(_state(seed=2, big=1 << 20)))
  _assert_bit_identical(restored, _state(seed=2, big=1 << 20))
  ckpt.close()
  with _manager(tmp_path) as again:
    restored, meta = again.restore_latest(_abstract(_state(big=1 << 20)))
  _assert_bit_identical(restored, _state(seed=3, big=1 << 20))
  assert meta["data"]["step"] == 2


def _need_8_devices():
  if jax.device_count() != 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py sets XLA_FLAGS), got {jax.device_count()}")


def test_restore_onto_a_different_mesh(tmp_path):
  _need_8_devices()
  state = _state(seed=4)
  mesh_8x1 = sharding.make_mesh({"data": 8, "fsdp": 1})
  mesh_1x8 = sharding.make_mesh({"data": 1, "fsdp": 8})
  # Save sharded: the state over fsdp=8, plus a leaf split over the data axis of the 8x1 mesh.
  sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh_1x8, min_fsdp_size=0)
  placed = jax.device_put(state, sh)
  placed = placed.replace(ema_params={**placed.ema_params, "vae": {**placed.ema_params["vae"], "conv": {
      **placed.ema_params["vae"]["conv"],
      "kernel": jax.device_put(state.ema_params["vae"]["conv"]["kernel"], NamedSharding(mesh_8x1, P(None, None, None, "data")))}}})
  assert placed.params["vae"]["conv"]["kernel"].sharding.spec == P(None, None, None, None, "fsdp")
  assert len({s.device for s in placed.ema_params["vae"]["conv"]["kernel"].addressable_shards}) == 8
  with _manager(tmp_path) as ckpt:
    ckpt.save(3, placed, {})

  mesh_2x4 = sharding.make_mesh({"data": 2, "fsdp": 4})
  with _manager(tmp_path) as ckpt:
    restored, _ = ckpt.restore_latest(_abstract(state, mesh_2x4, min_fsdp_size=0))
  _assert_bit_identical(restored, state)
  kernel = restored.params["vae"]["conv"]["kernel"]
  assert kernel.sharding.mesh is mesh_2x4 and kernel.sharding.spec == P(None, None, None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 8, 4)
  assert restored.opt_state[0].mu["vae"]["conv"]["kernel"].sharding.spec == P(None, None, None, None, "fsdp")

  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  with _manager(tmp_path) as ckpt:
    restored, _ = ckpt.restore_latest(_abstract(state, one))
  _assert_bit_identical(restored, state)
  assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(restored))


class Boom(RuntimeError):
  pass


def _raise(*args, **kwargs):
  raise Boom("simulated failure in the middle of a save")


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # the injected failure
@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("where", ["commit", "write"])
def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, async_save, where):
  good, new = _state(seed=5, step=1), _state(seed=6, step=2)
  ckpt = checkpoint.CheckpointManager(tmp_path, max_to_keep=1, enable_async_checkpointing=async_save)
  assert ckpt.save(1, good, _meta(1))
  ckpt.wait_until_finished()
  with monkeypatch.context() as m:
    if where == "commit":  # everything written to the temporary directory, the final rename fails
      m.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", _raise)
    else:  # the array writer fails
      m.setattr(ocp.PyTreeCheckpointHandler, "async_save", _raise)
    with pytest.raises(checkpoint.CheckpointSaveError, match="saving checkpoint step 2 failed: Boom .*the last good "
                       "checkpoint is step 1") as failed:
      ckpt.save(2, new, _meta(2))
      ckpt.wait_until_finished()
    assert isinstance(failed.value.__cause__, Boom)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  restored, meta = ckpt.restore_latest(_abstract(good))
  _assert_bit_identical(restored, good)
  assert meta["data"]["step"] == 1
  # The manager keeps working: a retry of the step commits. Step 1 stays besides it although max_to_keep=1: this
  # manager restored it, and keep-N never deletes the step a run restored.
  assert ckpt.save(2, new, _meta(2))
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [1, 2]
  if where == "write":  # a failure before the commit leaves a temporary directory...
    ckpt.save(3, new, _meta(3))
    with monkeypatch.context() as m:
      m.setattr(ocp.PyTreeCheckpointHandler, "async_save", _raise)
      with pytest.raises(checkpoint.CheckpointSaveError, match="step 4 failed: Boom"):
        ckpt.save(4, new, _meta(4))
        ckpt.wait_until_finished()
  ckpt.close()
  left = sorted(os.listdir(os.path.join(tmp_path, "checkpoints")))
  committed = [d for d in left if d.isdigit()]
  last = committed[-1]
  assert any(".orbax-checkpoint-tmp" in d for d in left) == (where == "write"), left
  assert last in ("2", "3") and committed == ["1", last]
  with _manager(tmp_path) as again:  # ...which a restart removes
    assert again.all_steps() == [1, int(last)]
    _assert_bit_identical(again.restore_latest(_abstract(new))[0], new)
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", last]


def test_incomplete_step_directories_are_ignored(tmp_path):
  state = _state(seed=8)
  with _manager(tmp_path) as ckpt:
    ckpt.save(1, state, _meta(1))
  root = os.path.join(tmp_path, "checkpoints")
  # A step copied half-way by a non-atomic filesystem (no commit file, no meta) and a killed write.
  shutil.copytree(os.path.join(root, "1", "state"), os.path.join(root, "2", "state"))
  os.remove(os.path.join(root, "2", "state", "commit_success.txt"))
  os.makedirs(os.path.join(root, "3.orbax-checkpoint-tmp-1234567", "state"))
  with _manager(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore_latest(_abstract(state))
    _assert_bit_identical(restored, state)
    with pytest.raises(ValueError, match="step 2 .* exists but was never committed"):
      ckpt.save(2, state, {})
  assert not os.path.exists(os.path.join(root, "3.orbax-checkpoint-tmp-1234567"))
  assert ckpt.directory.name == workdir_lib.CHECKPOINTS_DIR  # the layout the trainer writes is the one load_pretrained reads


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    import orbax.checkpoint as ocp
    from cvvae_jax.train import checkpoint
    workdir = sys.argv[1]
    ckpt = checkpoint.CheckpointManager(workdir, max_to_keep=1, enable_async_checkpointing=True)
    ckpt.save(1, {"w": jnp.full((1 << 16,), 1.0), "step": jnp.int32(1)}, {"step": 1})
    ckpt.wait_until_finished()
    async def stall(self):  # the process dies before the commit
      print("WRITTEN", flush=True)
      time.sleep(600)
    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = stall
    ckpt.save(2, {"w": jnp.full((1 << 16,), 2.0), "step": jnp.int32(2)}, {"step": 2})
    print("SAVING", flush=True)
    ckpt.wait_until_finished()
""")


def test_killed_process_mid_save_leaves_the_previous_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env, text=True)
  try:
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WRITTEN" not in line:
      line = proc.stdout.readline()
      if not line and proc.poll() is not None:
        break
    assert "WRITTEN" in line, f"child did not reach the save (exit code {proc.poll()})"
    root = os.path.join(tmp_path, "checkpoints")
    assert any(".orbax-checkpoint-tmp" in d for d in os.listdir(root)), os.listdir(root)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  abstract = {"w": jax.ShapeDtypeStruct((1 << 16,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=SingleDeviceSharding(jax.devices()[0]))}
  with _manager(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore_latest(abstract)
  assert int(restored["step"]) == 1 and float(restored["w"][0]) == 1.0 and meta == {"step": 1}
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1"]


def test_sigterm_sets_the_preemption_flag():
  before = signal.getsignal(signal.SIGTERM)
  reached = checkpoint.install_preemption_handler()
  try:
    assert not reached() and not reached(10)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not reached(11) and time.time() < deadline:
      time.sleep(0.01)
    assert reached(11) and reached()
  finally:
    reached.uninstall()
  assert signal.getsignal(signal.SIGTERM) == before


def _tiny_vae(**kw):
  return cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                         latent_channels=4, **kw)


@pytest.fixture(scope="module")
def vae_workdirs(tmp_path_factory):
  vae = _tiny_vae()
  # The params tree of `vae.init` (same paths, shapes, dtypes) with random values: compiling `vae.init`
  # takes ~30 s on 2 CPU cores, and what matters here is that the loaded values are the saved ones.
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s.shape).astype(s.dtype) for k, s in registry.param_shapes(vae).items()}
  params = jax.device_put(traverse_util.unflatten_dict(flat, sep="/"))
  ema = jax.device_put(traverse_util.unflatten_dict({k: v * 0.5 + 1.0 for k, v in flat.items()}, sep="/"))
  tx = optax.adamw(1e-4)
  state = {"params": {"vae": params, "disc": {"w": jnp.ones((4, 4))}},
           "ema_params": {"vae": ema},
           "opt_state": {"vae": tx.init(params), "disc": tx.init({"w": jnp.ones((4, 4))})},
           "step": jnp.int32(10), "rng": jax.random.key(3)}
  config = ml_collections.ConfigDict(dict(seed=0, model=dict(variant="sd21")))
  with_ema = str(tmp_path_factory.mktemp("with_ema"))
  with _manager(with_ema) as ckpt:
    ckpt.save(5, jax.tree.map(jnp.zeros_like, state), checkpoint.make_meta(model=vae, config=config))
    ckpt.save(10, state, checkpoint.make_meta(model=vae, config=config, data_state={"step": 10}))
  no_ema = str(tmp_path_factory.mktemp("no_ema"))
  with _manager(no_ema) as ckpt:
    ckpt.save(1, {k: v for k, v in state.items() if k != "ema_params"}, checkpoint.make_meta(model=vae))
  return vae, params, ema, with_ema, no_ema


def _equal_trees(got, ref):
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_load_model_from_workdir(vae_workdirs):
  vae, params, ema, with_ema, no_ema = vae_workdirs
  model, got = workdir_lib.load_model_from_workdir(with_ema, ema=False)
  assert isinstance(model, cvvae_jax.CVVAE)
  assert registry.model_spec(model) == registry.model_spec(vae)
  _equal_trees(got, params)
  _equal_trees(workdir_lib.load_model_from_workdir(with_ema, ema=True)[1], ema)
  _equal_trees(workdir_lib.load_model_from_workdir(with_ema)[1], ema)  # EMA when present
  _equal_trees(workdir_lib.load_model_from_workdir(with_ema, ema=False, step=5)[1],
               jax.tree.map(jnp.zeros_like, params))
  _equal_trees(workdir_lib.load_model_from_workdir(no_ema)[1], params)  # no EMA: the raw params
  with pytest.raises(ValueError, match="has no EMA params at ema_params/vae"):
    workdir_lib.load_model_from_workdir(no_ema, ema=True)
  with pytest.raises(ValueError, match=r"expected step to be one of the committed steps \[5, 10\], got 7"):
    workdir_lib.load_model_from_workdir(with_ema, step=7)
  with pytest.raises(ValueError, match="has no params at params/generator"):
    workdir_lib.load_model_from_workdir(with_ema, ema=False, params_path=("params", "generator"))


def test_load_pretrained_from_workdir(vae_workdirs):
  vae, params, ema, with_ema, _ = vae_workdirs
  model, got = cvvae_jax.load_pretrained(with_ema, dtype=jnp.bfloat16)
  assert isinstance(model, cvvae_jax.CVVAE) and model.dtype == jnp.bfloat16
  _equal_trees(got, ema)


def test_load_model_is_strict(vae_workdirs, tmp_path):
  vae, params, _, with_ema, _ = vae_workdirs
  wrong = str(tmp_path / "wrong")
  with _manager(wrong) as ckpt:
    spec = registry.model_spec(vae)
    spec["fields"]["latent_channels"] = 8  # the params are for 4 latent channels
    broken = {k: v for k, v in params.items()}
    broken["extra"] = {"kernel": jnp.ones((2, 2))}
    ckpt.save(1, {"params": {"vae": broken}}, {"model": spec})
  with pytest.raises(convert.ConversionError) as e:
    workdir_lib.load_model_from_workdir(wrong)
  message = str(e.value)
  assert "shape mismatches" in message and "encoder/conv_out/kernel: (3, 3, 3, 32, 8) vs (3, 3, 3, 32, 16)" in message
  assert "unexpected in the checkpoint" in message and "extra/kernel" in message
  empty = tmp_path / "empty"
  os.makedirs(empty / "checkpoints")
  with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
    workdir_lib.load_model_from_workdir(str(empty))
  with pytest.raises(ValueError, match=r"expected meta\['model'\]"):
    no_model = str(tmp_path / "no_model")
    with _manager(no_model) as ckpt:
      ckpt.save(1, {"params": {"vae": params}}, {})
    workdir_lib.load_model_from_workdir(no_model)
