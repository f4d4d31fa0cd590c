"""Shared test helpers: the reference data in testdata/, golden weight folders, tiny models, comparison measures."""
from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
from flax import traverse_util
from safetensors.numpy import save_file

from cvvae_jax.models import registry

# Reference data of the released models and golden outputs of the original code (testdata/README.md says where
# each file came from). Nothing outside the repository is read.
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
GOLDEN = os.path.join(REFERENCE, "golden")
GOLDEN_NAMES = ("cvvae_sd21_tiny", "cvvae_sd3_tiny", "sd21_image_vae_tiny", "sd3_image_vae_tiny")
FULL_NAMES = ("cvvae_sd21", "cvvae_sd3", "sd21_image_vae", "sd3_image_vae")


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref| (the golden fixtures' error measure)."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def read_tsv(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  out = {}
  with open(path) as f:
    for line in f:
      line = line.rstrip("\n")
      if not line or line.startswith("#"):
        continue
      key, shape, dtype = line.split("\t")[:3]
      out[key] = (tuple(int(s) for s in shape.split(",")) if shape else (), dtype)
  return out


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def golden_state_dict(name: str, salt: str = "") -> dict[str, np.ndarray]:
  """The deterministic weights of golden model `name` (torch names and shapes from `GOLDEN/<name>.params.tsv`).

  The recipe the golden outputs were made with (testdata/README.md), per key K of torch shape S:
  rng = Generator(PCG64(crc32(salt + K))); a tensor with ndim >= 2 ~ U(-b, b), b = 1/sqrt(prod(S[1:])); its bias
  the same bound as its weight; other 1-D weights (norm scales) 1 + 0.1 N(0, 1), other biases 0.1 N(0, 1); drawn in
  float64, stored as float32. `weights_checksums.json` records the result (tested in tests/weights/test_convert.py).
  """
  shapes = {key: shape for key, (shape, _) in read_tsv(os.path.join(GOLDEN, f"{name}.params.tsv")).items()}
  out = {}
  for key, shape in shapes.items():
    rng = np.random.Generator(np.random.PCG64(zlib.crc32((salt + key).encode())))
    weight = shapes.get(key[:-len("bias")] + "weight", ()) if key.endswith(".bias") else ()
    if len(shape) >= 2 or len(weight) >= 2:  # a conv / linear weight, or its bias: the weight's fan-in bound
      bound = 1.0 / np.sqrt(np.prod((shape if len(shape) >= 2 else weight)[1:]))
      arr = rng.uniform(-bound, bound, shape)
    elif key.endswith(".weight"):
      arr = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith(".bias"):
      arr = 0.1 * rng.standard_normal(shape)
    else:
      raise ValueError(f"no recipe for key {key}")
    out[key] = np.ascontiguousarray(arr.astype(np.float32))
  return out


def write_golden_folder(name: str, out_dir: str, salt: str = "") -> str:
  """An original-layout PyTorch folder (config.json + diffusion_pytorch_model.safetensors) of golden model `name`."""
  os.makedirs(out_dir, exist_ok=True)
  save_file(golden_state_dict(name, salt), os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(read_json(os.path.join(GOLDEN, f"{name}.config.json")), f, indent=2, sort_keys=True)
  return out_dir


def random_params(model, seed: int = 0):
  """Random float32 parameters of `model`'s shapes, drawn with numpy (seconds, where compiling `model.init` takes
  tens of seconds on CPU). Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0: for tests and benchmarks (memory and
  speed are the same as with real weights), not a training initialization."""
  registry.check_model(model)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), registry.example_input(model))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def to_channels_last(a: np.ndarray) -> np.ndarray:
  return np.moveaxis(np.asarray(a), 1, -1)


def jit_method(model, method: str):
  return jax.jit(lambda params, x: getattr(model.bind({"params": params}), method)(x))


def randomize_norms_and_biases(params, seed: int = 0):
  """Non-trivial biases (0.1 N(0,1)) and norm scales (1 + 0.1 N(0,1)), so tests see every parameter."""
  flat = traverse_util.flatten_dict(params, sep="/")
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  out = {}
  for key, (path, value) in zip(keys, flat.items()):
    if path.endswith("bias"):
      value = 0.1 * jax.random.normal(key, value.shape)
    elif path.endswith("scale"):
      value = 1.0 + 0.1 * jax.random.normal(key, value.shape)
    out[path] = value
  return traverse_util.unflatten_dict(out, sep="/")


def conv_arrays(x_shape, kernel_shape, seed=0):
  """(x, kernel, bias) float32 of a convolution test: unit normal input, kernel scaled by its fan-in."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:-1])), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(kernel_shape[-1]), jnp.float32)
  return x, kernel, bias


def tiny_input(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32, -1.0, 1.0)


def astronaut_videos(b=2, t=5, h=40, w=48, seed=0):
  """Natural-image crops (astronaut) and distorted copies, videos [B, T, H, W, 3] in [-1, 1]."""
  rng = np.random.default_rng(seed)
  img = skimage.data.astronaut().astype(np.float32) / 127.5 - 1.0
  x = np.empty((b, t, h, w, 3), np.float32)
  for i in range(b):
    for j in range(t):
      r, c = rng.integers(0, 512 - h), rng.integers(0, 512 - w)
      x[i, j] = img[r:r + h, c:c + w]
  sigma = rng.uniform(0.02, 0.3, size=(b, t, 1, 1, 1)).astype(np.float32)
  y = np.clip(x + sigma * rng.normal(size=x.shape).astype(np.float32), -1, 1)
  return x, y


def index_video(b=3, k=2, h=2, w=2, c=3):
  """Video whose pixels hold 100 * example + frame index: [B, 1+4k, H, W, C]."""
  t = 1 + 4 * k
  values = 100.0 * np.arange(b)[:, None] + np.arange(t)[None, :]
  return jnp.asarray(np.broadcast_to(values[:, :, None, None, None], (b, t, h, w, c)).astype(np.float32))
