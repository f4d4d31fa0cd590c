"""Tests of cvvae_jax.discriminator: shapes for T = 1 and T = 9, init statistics, parity with a small PyTorch
(NCTHW) re-implementation of the original NLayerDiscriminator3D written from its description."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models import discriminator as D

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional


class _TorchResBlock(tnn.Module):
  """Original res block: norm1, silu, conv1, [time-dup + avg_pool3d], norm2, silu, conv2; nin shortcut."""

  def __init__(self, c_in, c_out, down):
    super().__init__()
    self.down = down
    self.norm1, self.norm2 = tnn.GroupNorm(32, c_in, eps=1e-5), tnn.GroupNorm(32, c_out, eps=1e-5)
    self.conv1 = tnn.Conv3d(c_in, c_out, 3, 1, 1)
    self.conv2 = tnn.Conv3d(c_out, c_out, 3, 1, 1)
    self.nin = tnn.Conv3d(c_in, c_out, 1, 1, 0) if c_in != c_out else None

  @staticmethod
  def _pool(x):
    if x.shape[2] % 2 == 1:
      x = torch.cat([x[:, :, :1], x], dim=2)
    return F.avg_pool3d(x, kernel_size=2, stride=2)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    if self.down:
      h = self._pool(h)
    h = self.conv2(F.silu(self.norm2(h)))
    if self.down:
      x = self._pool(x)
    if self.nin is not None:
      x = self.nin(x)
    return x + h


class _TorchDisc(tnn.Module):

  def __init__(self, ndf, n_layers):
    super().__init__()
    self.conv_in = tnn.Conv3d(3, ndf, 3, 2, 1)
    self.blocks, self.norms = tnn.ModuleList(), tnn.ModuleList()
    mult = 1
    specs = [(min(2**n, 8), True) for n in range(1, n_layers - 1)]
    specs += [(min(2**n_layers, 8), False)] * 2
    for new_mult, down in specs:
      self.blocks.append(_TorchResBlock(ndf * mult, ndf * new_mult, down))
      self.norms.append(tnn.GroupNorm(32, ndf * new_mult, eps=1e-5))
      mult = new_mult
    self.conv_out = tnn.Conv3d(ndf * mult, 1, 3, 1, 1)

  def forward(self, x):
    h = F.leaky_relu(self.conv_in(x), 0.2)
    for block, norm in zip(self.blocks, self.norms):
      h = F.leaky_relu(norm(block(h)), 0.2)
    return self.conv_out(h)


def _load_into_torch(model, params):
  """Copies our Flax params (THWIO kernels) into the PyTorch model (OITHW)."""

  def conv(m, p):
    m.weight.copy_(torch.from_numpy(np.asarray(p["conv"]["kernel"]).transpose(4, 3, 0, 1, 2).copy()))
    m.bias.copy_(torch.from_numpy(np.array(p["conv"]["bias"])))

  def norm(m, p):
    m.weight.copy_(torch.from_numpy(np.array(p["norm"]["scale"])))
    m.bias.copy_(torch.from_numpy(np.array(p["norm"]["bias"])))

  with torch.no_grad():
    conv(model.conv_in, params["conv_in"])
    conv(model.conv_out, params["conv_out"])
    for i, (block, n) in enumerate(zip(model.blocks, model.norms)):
      p = params[f"block_{i}"]
      conv(block.conv1, p["conv1"])
      conv(block.conv2, p["conv2"])
      norm(block.norm1, p["norm1"])
      norm(block.norm2, p["norm2"])
      if block.nin is not None:
        conv(block.nin, p["shortcut"])
      else:
        assert "shortcut" not in p
      norm(n, params[f"norm_{i}"])


def _random_params(model, x, seed):
  """Random parameters of the right shapes, drawn in numpy (compiling `init` costs ~10 s on CPU).

  GroupNorm scales and biases get random values too, so the parity test exercises them.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      value = rng.normal(0.0, 0.02, leaf.shape)
    elif "['norm']['scale']" in name:
      value = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    leaves.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("t", [1, 5])
def test_matches_torch_reference(t):
  model = D.PatchDiscriminator3D(ndf=32, n_layers=4)
  x = jax.random.uniform(jax.random.key(1), (2, t, 24, 32, 3), minval=-1, maxval=1)
  params = _random_params(model, x, seed=t)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x))
  ref_model = _TorchDisc(32, 4)
  _load_into_torch(ref_model, params)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(np.asarray(x).transpose(0, 4, 1, 2, 3).copy()))
  ref = ref.numpy().transpose(0, 2, 3, 4, 1)
  assert ours.shape == ref.shape == (2,) + D.patch_grid(t, 24, 32, 4) + (1,)
  assert np.std(ref) > 1e-3  # a real signal, not a constant
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_shapes_t1_t9_and_images():
  model = D.PatchDiscriminator3D()  # ndf 64, n_layers 4: the released config
  for t, expect_t in [(1, 1), (9, 2), (17, 3)]:
    x = jax.ShapeDtypeStruct((2, t, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, variables, x)
    assert out.shape == (2, expect_t, 8, 8, 1) and out.dtype == jnp.float32
    assert D.patch_grid(t, 64, 64, 4) == (expect_t, 8, 8)
  img = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  assert jax.eval_shape(model.apply, variables, img).shape == (2, 1, 8, 8, 1)
  # n_layers 3 (classic PatchGAN depth): one downsampling block.
  small = D.PatchDiscriminator3D(ndf=32, n_layers=3)
  x = jax.ShapeDtypeStruct((1, 9, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(small.apply, jax.eval_shape(small.init, jax.random.key(0), x), x)
  assert out.shape == (1, 3, 8, 8, 1)


def test_image_equals_one_frame_clip():
  model = D.PatchDiscriminator3D(ndf=32, n_layers=3)
  img = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1)
  params = {"params": _random_params(model, img, seed=3)}
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(np.asarray(apply(params, img)), np.asarray(apply(params, img[:, None])))


def test_param_count_matches_torch_and_init_statistics():
  model = D.PatchDiscriminator3D()
  x = jnp.zeros((1, 1, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  count = sum(p.size for p in jax.tree_util.tree_leaves(params))
  assert count == sum(p.numel() for p in _TorchDisc(64, 4).parameters())
  assert params["block_2"]["conv1"]["conv"]["kernel"].shape == (3, 3, 3, 256, 512)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = [np.asarray(v) for p, v in flat if jax.tree_util.keystr(p).endswith("['kernel']")]
  assert len(kernels) == 2 + 4 * 2 + 3  # conv_in, conv_out, 2 convs per block, 3 shortcuts
  all_k = np.concatenate([k.ravel() for k in kernels])
  assert abs(all_k.std() - 0.02) < 2e-4 and abs(all_k.mean()) < 2e-4
  for k in kernels:
    if k.size > 10_000:
      assert abs(k.std() - 0.02) < 1e-3
  # Biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); conv_in fan_in = 3 * 27.
  b = np.asarray(params["conv_in"]["conv"]["bias"])
  bound = 1 / np.sqrt(81)
  assert np.all(np.abs(b) <= bound) and b.std() > bound / 4
  for p, v in flat:
    name = jax.tree_util.keystr(p)
    if "['norm']['scale']" in name:
      np.testing.assert_array_equal(np.asarray(v), 1.0)
    if "['norm']['bias']" in name:
      np.testing.assert_array_equal(np.asarray(v), 0.0)


def test_bfloat16_compute_keeps_float32_params():
  x = jax.random.uniform(jax.random.key(4), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  f32 = D.PatchDiscriminator3D(ndf=32, n_layers=3)
  bf16 = D.PatchDiscriminator3D(ndf=32, n_layers=3, dtype=jnp.bfloat16)
  params = {"params": _random_params(f32, x, seed=4)}
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  a, b = jax.jit(f32.apply)(params, x), jax.jit(bf16.apply)(params, x)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.05 * float(jnp.abs(a).max()) + 1e-3)


def test_errors():
  with pytest.raises(ValueError, match="n_layers >= 1"):
    D.channel_plan(64, 0)
  model = D.PatchDiscriminator3D(ndf=32, n_layers=4)
  with pytest.raises(ValueError, match="large enough"):
    model.init(jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
    model.init(jax.random.key(0), jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match="divisible by 32"):
    D.PatchDiscriminator3D(ndf=48).init(jax.random.key(0), jnp.zeros((1, 1, 16, 16, 3)))
