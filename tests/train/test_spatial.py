"""The spatial mesh axis (`mesh.spatial`): one clip's height split over K devices gives the losses, gradients and
updates of the unsplit step, and the activations really are split (8 fake CPU devices,
tests/conftest.py). The convolutions are the accelerator path (`conv_impl="xla"`), whose programs XLA:CPU
partitions and compiles fastest; the partitioned programs still take minutes to compile here (marked slow)."""
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.train import build, sharding
from cvvae_jax.train import step as step_lib
from cvvae_jax.train.state import init_state
from tests import helpers
from tests.train.test_train import image_vae_dir, tiny_config  # noqa: F401  (a fixture)

SIZE = (32, 16)  # H, W: 4 levels (8x down) on spatial=4 need H % 32 == 0; level 0 has 8 rows per device
LOSSES = ("loss/total", "loss/nll", "loss/kl", "loss/reg_decoder")
STEPS = 2  # a generator and a discriminator update (two programs per mesh)


def _need_8_devices():
  if jax.device_count() != 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py sets XLA_FLAGS), got {jax.device_count()}")


def _config(image_vae_dir):  # noqa: F811
  c = tiny_config(image_vae_dir)
  with c.unlocked():
    c.loss.disc_start = 0  # the GAN term and its adaptive weight (a second backward pass) are on from step 0
    c.data.streams.video.size = SIZE
    c.train.conv_impl = c.train.upsample_impl = "xla"
  return c


class Run:
  """Steps of the tiny config on one mesh, from the same initial state and batches as every other mesh."""

  def __init__(self, image_vae_dir, mesh_cfg, devices):  # noqa: F811
    config = _config(image_vae_dir)
    self.mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:devices])
    image_vae, frozen = build.load_frozen(config, "cvvae")
    self.models = build.build_models(config, image_vae, sharding.activation_sharding(self.mesh))
    abstract = jax.eval_shape(functools.partial(init_state, self.models), jax.random.PRNGKey(0))
    self.state_sh = sharding.state_shardings(abstract, self.mesh)
    frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen), self.mesh)
    self.frozen = jax.device_put(frozen, frozen_sh)
    self.step_fn = step_lib.TrainStep(self.models, self.mesh, self.state_sh, frozen_sh)
    self.state = jax.jit(functools.partial(init_state, self.models), out_shardings=self.state_sh)(
        jax.random.PRNGKey(0))

  def steps(self, batches):
    """Metrics of each step (G, D, G, ...: the loop's alternation) and the final state."""
    out = []
    for i, batch in enumerate(batches):
      self.state, metrics, _ = self.step_fn(self.state, sharding.shard_host_batch(batch, self.mesh),
                                            jax.random.PRNGKey(0), self.frozen, i)
      out.append(jax.device_get(metrics))
    return out, jax.device_get(self.state)


def _batches(n, b=4):
  return [{"video": helpers.tiny_input((b, 5, *SIZE, 3), seed=10 + i)} for i in range(n)]


def _assert_close_to_scale(got, want, rtol):
  """max |got - want| over a tree <= rtol * max |want| (some gradients are zero up to float noise)."""
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree_util.tree_leaves(want))
  assert diff <= rtol * scale, (diff, scale)


@pytest.fixture(scope="module")
def reference(image_vae_dir):  # noqa: F811
  _need_8_devices()
  return Run(image_vae_dir, {"data": 1, "fsdp": 1}, 1).steps(_batches(STEPS))


@pytest.mark.slow
# fsdp=2 x spatial=4 runs with the parameters gathered for the step (sharding.params_at_use, an XLA partitioner bug):
# without it the discriminator's input gradient, hence the adaptive GAN weight, came out 4x too large.
@pytest.mark.parametrize("mesh_cfg", [{"data": 1, "fsdp": 1, "spatial": 4}, {"data": 2, "fsdp": 1, "spatial": 4},
                                      {"data": 1, "fsdp": 2, "spatial": 4}],
                         ids=["spatial4", "data2_spatial4", "fsdp2_spatial4"])
def test_spatial_split_matches_the_unsplit_step(image_vae_dir, reference, mesh_cfg):  # noqa: F811
  devices = mesh_cfg["data"] * mesh_cfg["fsdp"] * mesh_cfg["spatial"]
  run = Run(image_vae_dir, mesh_cfg, devices)
  metrics, state = run.steps(_batches(STEPS))
  ref_metrics, ref_state = reference
  for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
    for key in [k for k in LOSSES + ("loss/disc",) if k in want]:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"step {step} {key}")
    # Norms of gradients summed in another order (as tests/train/test_train.py's mesh parity): measured 1.03e-5.
    for key in [k for k in ("grad_norm/generator", "grad_norm/discriminator") if k in want]:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=f"step {step} {key}")
  # Two steps of updates (G then D): Adam's first moments (the gradients) agree; the params to a learning rate:
  # Adam turns float noise in near-zero gradients (biases before a GroupNorm) into +-lr steps (measured 1.03e-4).
  _assert_close_to_scale(state.opt_state[1][0].mu, ref_state.opt_state[1][0].mu, 1e-4)
  _assert_close_to_scale(state.params, ref_state.params, 5e-4)
  _assert_close_to_scale(state.disc_params, ref_state.disc_params, 5e-4)


def _conv_output_heights(hlo: str) -> set[int]:
  """Heights of every convolution output of a compiled (per-device) HLO module: `[B, T, H, W, C]` or `[N, H, W, C]`
  (kernel gradients `[3, 3, 3, Ci, Co]` count their third dimension, at most 3)."""
  shapes = re.findall(r"= \w+\[([\d,]+)\]\S* convolution\(", hlo)
  return {int(d.split(",")[-3]) for d in shapes}


@pytest.mark.slow
def test_vae_gradients_match_and_activations_are_split():
  """The VAE's reconstruction loss and gradients on spatial=4 equal spatial=1's, and every convolution of the
  partitioned program works on a quarter of the rows (GroupNorm statistics all-reduced across the axis)."""
  _need_8_devices()
  x = helpers.tiny_input((2, 5, *SIZE, 3), seed=4)
  out = {}
  for spatial in (1, 4):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "spatial": spatial}, devices=jax.devices()[:spatial])
    vae = CVVAE(block_out_channels=(32,) * 4, layers_per_block=1, conv_impl="xla", upsample_impl="xla",
                activation_sharding=sharding.activation_sharding(mesh))
    params = jax.jit(vae.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1, 8, 8, 3)))["params"]
    xs = sharding.shard_host_batch({"video": x}, mesh)["video"]
    if spatial == 4:
      assert xs.sharding.spec == P(("data", "fsdp"), None, "spatial")
      assert {s.data.shape for s in xs.addressable_shards} == {(2, 5, SIZE[0] // 4, SIZE[1], 3)}
    loss = lambda p, x, vae=vae: jnp.mean(jnp.abs(vae.apply({"params": p}, x)[0] - x))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, xs).compile()
    out[spatial] = compiled(params, xs), compiled.as_text()
  (loss1, grads1), hlo1 = out[1]
  (loss4, grads4), hlo4 = out[4]
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  # Kernel gradients sum over every pixel, in another order when the rows are split: measured 5.7e-5 of the largest
  # gradient (3.6e-6 / 0.063) in float32.
  _assert_close_to_scale(grads4, grads1, 1e-4)
  assert max(_conv_output_heights(hlo1)) == SIZE[0]  # full-resolution convolutions, unsplit
  assert max(_conv_output_heights(hlo4)) == SIZE[0] // 4, sorted(_conv_output_heights(hlo4))
  assert "all-reduce" in hlo4 and "all-reduce" not in hlo1


def test_params_at_use_gives_the_unsplit_input_gradient():
  """The XLA partitioner bug `sharding.params_at_use` works around (its docstring): a stride-2 conv, then a conv whose
  kernel is split over `fsdp` on its output channels, input split over fsdp (batch) and spatial (height). With the
  kernels gathered the input gradient is the unsplit one (without, on jax 0.10.2, it is 4x too large)."""
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "spatial": 4})
  x = helpers.tiny_input((2, 32, 16, 3), seed=0)
  k1 = 0.2 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 64))
  k2 = 0.2 * jax.random.normal(jax.random.PRNGKey(2), (3, 3, 64, 64))
  conv = lambda x, k, s: jax.lax.conv_general_dilated(x, k, (s, s), [(1, 1)] * 2,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def loss(x, kernels, mesh):
    k1, k2 = sharding.params_at_use(kernels, mesh)
    return jnp.mean(jnp.tanh(conv(jnp.tanh(conv(x, k1, 2)), k2, 1)))

  want = jax.jit(jax.grad(loss), static_argnums=2)(x, (k1, k2), None)
  put = lambda a, *spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, P(*spec)))
  got = jax.jit(jax.grad(loss), static_argnums=2)(put(x, ("data", "fsdp"), "spatial"),
                                                  (put(k1), put(k2, None, None, None, "fsdp")), mesh)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
  for cfg in ({"data": 1, "fsdp": 8, "spatial": 1}, {"data": 8, "fsdp": 1, "spatial": 1}):  # no height split
    assert sharding.params_at_use(k1, sharding.make_mesh(cfg)) is k1


@pytest.mark.slow
def test_kernels_are_gathered_where_used_and_again_in_the_recomputed_backward():
  """On a spatial mesh the autoencoder's kernels (split over `fsdp x spatial`) are gathered by the layers that use
  them (`partitioning.gather_at_use`): under `remat="full"` each unit gathers its kernels again for its recomputed
  forward in the backward pass (more all-gathers than without remat, where each is gathered once and kept)."""
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "spatial": 4}, devices=jax.devices()[:4])
  x = sharding.shard_host_batch({"video": helpers.tiny_input((1, 5, *SIZE, 3), seed=5)}, mesh)["video"]
  gathers = {}
  for remat in ("none", "full"):
    vae = CVVAE(block_out_channels=(32,) * 4, layers_per_block=1, conv_impl="xla", upsample_impl="xla", remat=remat,
                activation_sharding=sharding.activation_sharding(mesh))
    params = jax.jit(vae.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1, 8, 8, 3)))["params"]
    shardings = sharding.param_shardings(params, mesh)
    assert shardings["decoder"]["up_0"]["res_0"]["conv1"]["kernel"].spec != P()  # split: the gathers are needed
    params = jax.device_put(params, shardings)
    loss = lambda p, x, vae=vae: jnp.mean(jnp.abs(vae.apply({"params": p}, x)[0] - x))
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    gathers[remat] = len(re.findall(r"= f32\[3,3,3,32,32\]\S* all-gather\(", hlo))
  assert 0 < gathers["none"] < gathers["full"], gathers


def test_spatial_sizes_are_checked_per_level():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "spatial": 4})
  sharding.check_spatial_size((64, 48), mesh, 4, "config.data.streams.video.size")
  with pytest.raises(ValueError, match=r"config.data.streams.video.size: height 48 does not split over "
                                       r"mesh.spatial=4 at level 3 \(height 6\); expected a multiple of "
                                       r"mesh.spatial \* 2\^3 = 32"):
    sharding.check_spatial_size((48, 64), mesh, 4, "config.data.streams.video.size")
  with pytest.raises(ValueError, match="height 30 is not divisible by mesh.spatial=4"):
    sharding.shard_host_batch({"video": np.zeros((2, 1, 30, 8, 3), np.float32)}, mesh)
  sharding.check_spatial_size((64, 64), sharding.make_mesh({"data": 1, "fsdp": 2, "spatial": 4}), 4, "size")
  with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp \* mesh.spatial = 16 but 8 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 1, "spatial": 4})


def test_mesh_defaults_and_batch_specs():
  _need_8_devices()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})  # configs from before the spatial axis: spatial = 1
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "spatial": 1}
  assert sharding.activation_sharding(mesh) is None
  assert sharding.make_mesh({"data": 2, "fsdp": 1, "spatial": -1}).shape["spatial"] == 4
  assert sharding.batch_spec(5) == P(("data", "fsdp"), None, "spatial")
  assert sharding.batch_spec(4) == P(("data", "fsdp"), "spatial")
  assert sharding.data_groups(mesh) == (0, 1)
  images = sharding.shard_host_batch({"x": np.zeros((8, 32, 8, 3), np.float32)},
                                     sharding.make_mesh({"data": 2, "fsdp": 1, "spatial": 4}))["x"]
  assert {s.data.shape for s in images.addressable_shards} == {(4, 8, 8, 3)}
  assert jnp.array_equal(images, jnp.zeros((8, 32, 8, 3)))


@pytest.mark.slow
def test_two_processes_share_clips_of_a_spatial_group(tmp_path):
  """2 processes x 2 CPU devices: with spatial=4 both processes hold rows of the same clips and load the same ones
  (`data_groups`); with data=2 x spatial=2 each process loads its own; the global batch is the same either way."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, os.path.join(root, "scripts", "launch_local.py"), "-n", "2", "-d", "2", "--",
                        os.path.join(root, "tests", "train", "spatial_hosts_worker.py")],
                       cwd=root, env=dict(os.environ, PYTHONPATH=root, SPATIAL_HOSTS_OUT=str(tmp_path)),
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  for p in (0, 1):
    assert (tmp_path / f"p{p}.txt").read_text().splitlines() == [
        "OK {'data': 1, 'fsdp': 1, 'spatial': 4}", "OK {'data': 2, 'fsdp': 1, 'spatial': 2}"], out.stdout[-3000:]
