"""Shared test helpers: reference files, golden folders, tiny models and comparison measures."""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE = os.environ.get("CVVAE_REFERENCE", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                           "reference"))
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


@functools.lru_cache(maxsize=None)
def _make_weights_module():
  spec = importlib.util.spec_from_file_location("make_weights", os.path.join(GOLDEN, "make_weights.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def write_golden_folder(name: str, out_dir: str, salt: str = "") -> str:
  """An original-layout PyTorch folder with the fixture recipe's deterministic weights."""
  return _make_weights_module().write_folder(name, out_dir, salt)


def to_channels_last(a: np.ndarray) -> np.ndarray:
  return np.moveaxis(np.asarray(a), 1, -1)


def jit_method(model, method: str):
  return jax.jit(lambda params, x: getattr(model.bind({"params": params}), method)(x))


def randomize_norms_and_biases(params, seed: int = 0):
  """Non-trivial biases (0.1 N(0,1)) and norm scales (1 + 0.1 N(0,1)), so tests see every parameter."""
  from flax import traverse_util
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


def tiny_input(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32, -1.0, 1.0)
