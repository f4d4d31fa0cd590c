"""Gradient accumulation (`train.grad_accum_steps`, `train.image_micro_batch`): how many micro-batches a step takes,
what each holds, and that each keeps the batch's sharding (8 fake CPU devices, tests/conftest.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cvvae_jax.train import build, sharding
from cvvae_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class _Models:  # the fields `step.micro_batches` reads
  grad_accum_steps: int = 1
  image_micro_batch: int = 0


def _mesh(data=8):
  if jax.device_count() < data:
    pytest.skip(f"needs {data} devices (tests/conftest.py sets XLA_FLAGS), got {jax.device_count()}")
  return sharding.make_mesh({"data": data, "fsdp": 1, "spatial": 1}, devices=jax.devices()[:data])


def test_micro_batches_of_image_and_video_batches():
  mesh = _mesh()
  images, clips = (64, 1, 32, 32, 3), (8, 17, 32, 32, 3)
  assert step_lib.micro_batches(_Models(), images, mesh) == 1
  assert step_lib.micro_batches(_Models(grad_accum_steps=2), clips, mesh) == 2
  # images: 8 per device, one at a time -> 8 micro-batches; 4 at a time -> 2; clips keep grad_accum_steps
  assert step_lib.micro_batches(_Models(image_micro_batch=1), images, mesh) == 8
  assert step_lib.micro_batches(_Models(image_micro_batch=4), images, mesh) == 2
  assert step_lib.micro_batches(_Models(grad_accum_steps=3, image_micro_batch=1), clips, mesh) == 3
  assert step_lib.micro_batches(_Models(image_micro_batch=2), (4, 1, 32, 32, 3), None) == 2  # no mesh: one device
  with pytest.raises(ValueError, match=r"image_micro_batch=3 must divide the images per device .*, 8"):
    step_lib.micro_batches(_Models(image_micro_batch=3), images, mesh)


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_each_micro_batch_takes_every_kth_example_and_keeps_the_batch_sharding(loop):
  mesh = _mesh()
  accum, batch = 4, 32  # 4 examples per device
  x = jnp.arange(batch * 3, dtype=jnp.float32).reshape(batch, 3)
  x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  params = jnp.ones((3,), jnp.float32)
  seen = []

  def loss_fn(p, xi, ri):
    jax.debug.inspect_array_sharding(xi, callback=seen.append)
    noise = jax.random.uniform(ri, ())
    return jnp.mean(xi @ p) * (1 + noise), {"first": xi[0, 0]}

  run = jax.jit(lambda p, x, rng: step_lib._accumulated_grads(loss_fn, p, x, rng, accum, loop))
  loss, metrics, grads = run(params, x, jax.random.PRNGKey(0))

  rngs = jax.random.split(jax.random.PRNGKey(0), accum)
  xs = np.asarray(jax.device_get(x))
  micro = [xs[j::accum] for j in range(accum)]  # micro-batch j: examples j, j + accum, ...
  want_loss = np.mean([np.mean(m @ np.ones(3)) * (1 + float(jax.random.uniform(r, ()))) for m, r in zip(micro, rngs)])
  want_grads = np.mean([m.mean(0) * (1 + float(jax.random.uniform(r, ()))) for m, r in zip(micro, rngs)], axis=0)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads), want_grads, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["first"]), np.mean([m[0, 0] for m in micro]))
  # Inside the loop, each micro-batch (8 examples) is split over all 8 devices: one example each.
  assert seen, "the sharding callback did not run"
  assert all(s.shard_shape((batch // accum, 3)) == (1, 3) for s in seen), seen


def test_image_micro_batch_builds_from_the_config():
  from configs import cvvae as cvvae_config
  assert cvvae_config.get_config("sd21,full").train.image_micro_batch == 1
  assert cvvae_config.get_config("sd21,demo").train.image_micro_batch == 0


def test_accum_loop_resolves_by_platform():
  assert build.resolve_accum_loop("auto", "cpu") == "unrolled"
  assert build.resolve_accum_loop("auto", "tpu") == build.resolve_accum_loop("auto", "gpu") == "scan"
  assert build.resolve_accum_loop("scan", "cpu") == "scan"
  with pytest.raises(ValueError, match=r"config.train.accum_loop: expected one of"):
    build.resolve_accum_loop("while", "cpu")


def test_scan_and_unrolled_give_the_same_sums():
  def loss_fn(p, xi, ri):
    y = jnp.tanh(xi @ p) * (1 + jax.random.uniform(ri, ()))
    return jnp.mean(y ** 2), {"mean": jnp.mean(y)}
  p = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
  x = jax.random.normal(jax.random.PRNGKey(2), (12, 5))
  outs = [jax.jit(lambda p, x, loop=loop: step_lib._accumulated_grads(loss_fn, p, x, jax.random.PRNGKey(3), 3,
                                                                      loop))(p, x) for loop in ("scan", "unrolled")]
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
