"""Loading and saving whole models: `load_pretrained`, `save_pretrained`, and our Flax format (`save_flax`).

Formats `load_pretrained(path)` accepts:
  * an original PyTorch folder: `config.json` + `diffusion_pytorch_model.safetensors` of `CVVAEModel` (SD2.1
    CV-VAE), `CVVAESD3Model` (SD3 CV-VAE) or diffusers `AutoencoderKL` (SD image VAE);
  * our Flax export (`save_flax`): `model.json` (the model spec, `models.registry`) + `params/` (an Orbax checkpoint);
  * a training workdir: the latest checkpoint under `<workdir>/checkpoints` (see `workdir.py`).
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from cvvae_jax import paths
from cvvae_jax.models import registry
from cvvae_jax.weights import torch_format, workdir

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_flax(model, params, path: str) -> str:
  """Writes our format: `path/model.json` and an Orbax checkpoint of the params in `path/params` (`path` local or
  `gs://...`); returns `path` (local paths made absolute)."""
  root = paths.path(path)
  root.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / PARAMS_DIR, jax.device_get(params), force=True)
  paths.write_atomic(root / MODEL_JSON, json.dumps(registry.model_spec(model), indent=2))
  return os.fspath(root)


def is_flax_export(path: str) -> bool:
  root = paths.path(path)
  return (root / MODEL_JSON).is_file() and (root / PARAMS_DIR).is_dir()


def load_flax(path: str, **overrides):
  """(model, params) of our export (local or `gs://...`); `overrides` set run-time model fields."""
  root = paths.path(path)
  model = registry.model_from_spec(json.loads((root / MODEL_JSON).read_text()), **overrides)
  target = traverse_util.unflatten_dict(registry.param_shapes(model), sep="/")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(root / PARAMS_DIR, target)
  return model, params


def load_pretrained(path: str, **overrides):
  """Loads `(model, params)` from an original PyTorch folder, our Flax export, or a training workdir.

  `overrides` set run-time model fields, e.g. `dtype=jnp.bfloat16` (compute) or `remat=True`.
  Returns a Flax module (`CVVAE` or `ImageVAE`) and its `params` pytree (float32 arrays).
  """
  path = os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"no such model path: {path}")
  if torch_format.is_torch_folder(path):
    return torch_format.load_torch_folder(path, **overrides)
  if _is_remote_torch_folder(path):
    return _load_remote_torch_folder(path, **overrides)
  if is_flax_export(path):
    return load_flax(path, **overrides)
  if workdir.is_workdir(path):
    return workdir.load_model_from_workdir(path, **overrides)
  found = sorted(p.name for p in paths.path(path).iterdir())[:10] if paths.path(path).is_dir() else "a file"
  raise ValueError(f"{path} is not a model: expected an original PyTorch folder ({torch_format.CONFIG_NAME} + "
                   f"{torch_format.WEIGHTS_NAME}), our Flax export ({MODEL_JSON} + {PARAMS_DIR}/) or a training "
                   f"workdir with {workdir.CHECKPOINTS_DIR}/; found {found}")


def _is_remote_torch_folder(path: str) -> bool:
  root = paths.path(path)
  return paths.is_remote(path) and all((root / n).is_file() for n in (torch_format.CONFIG_NAME,
                                                                       torch_format.WEIGHTS_NAME))


def _load_remote_torch_folder(path: str, **overrides):
  """An original PyTorch folder on a bucket: its two files copied to a local temporary folder, then loaded."""
  with tempfile.TemporaryDirectory(prefix="cvvae_torch_") as local:
    for name in (torch_format.CONFIG_NAME, torch_format.WEIGHTS_NAME):
      with open(os.path.join(local, name), "wb") as f:
        f.write((paths.path(path) / name).read_bytes())
    return torch_format.load_torch_folder(local, **overrides)  # arrays converted (copied) from the files


def save_pretrained(model, params, out_dir: str) -> str:
  """Writes the original PyTorch folder layout (config.json + diffusion_pytorch_model.safetensors)."""
  return torch_format.save_torch_folder(model, params, out_dir)
