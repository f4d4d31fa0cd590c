"""Loading and saving whole models: `load_pretrained`, `save_pretrained`, and our Orbax format.

Formats `load_pretrained(path)` accepts:
  * an original PyTorch folder: `config.json` + `diffusion_pytorch_model.safetensors` of `CVVAEModel` (SD2.1
    CV-VAE), `CVVAESD3Model` (SD3 CV-VAE) or diffusers `AutoencoderKL` (SD image VAE);
  * our Flax export (`save_flax`): `model.json` (the model's class and fields) + `params/` (an Orbax checkpoint);
  * a training workdir: the latest checkpoint under `<workdir>/checkpoints` (see `checkpoint.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from cvvae_jax import convert
from cvvae_jax.sd_vae import ImageVAE
from cvvae_jax.vae3d import CVVAE

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"  # inside a training workdir
_MODEL_CLASSES = {"CVVAE": CVVAE, "ImageVAE": ImageVAE}
# Run-time choices, not architecture: never stored, settable through `load_pretrained(**overrides)`.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "precision", "remat", "parent", "name")


def model_spec(model) -> dict[str, Any]:
  """The JSON-able description of a model's architecture: {"class": ..., "fields": {...}}."""
  cls = type(model).__name__
  if cls not in _MODEL_CLASSES:
    raise TypeError(f"expected a CVVAE or ImageVAE, got {cls}")
  fields = {}
  for f in dataclasses.fields(model):
    if f.name in _RUNTIME_FIELDS:
      continue
    value = getattr(model, f.name)
    fields[f.name] = list(value) if isinstance(value, tuple) else value
  return {"class": cls, "fields": fields}


def model_from_spec(spec: dict[str, Any], **overrides):
  cls = _MODEL_CLASSES.get(spec.get("class"))
  if cls is None:
    raise ValueError(f"unknown model class {spec.get('class')!r} in {MODEL_JSON}; expected one of "
                     f"{sorted(_MODEL_CLASSES)}")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["fields"].items()}
  return cls(**fields, **overrides)


def save_flax(model, params, path: str) -> str:
  """Writes our format: `path/model.json` and an Orbax checkpoint of the params in `path/params`."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), jax.device_get(params), force=True)
  with open(os.path.join(path, MODEL_JSON), "w") as f:
    json.dump(model_spec(model), f, indent=2)
  return path


def is_flax_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def load_flax(path: str, **overrides):
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  with open(os.path.join(path, MODEL_JSON)) as f:
    model = model_from_spec(json.load(f), **overrides)
  abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                    convert.init_shapes(model))
  from flax import traverse_util
  target = traverse_util.unflatten_dict(abstract, sep="/")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
  return model, params


def load_pretrained(path: str, **overrides):
  """Loads `(model, params)` from an original PyTorch folder, our Flax export, or a training workdir.

  `overrides` set run-time model fields, e.g. `dtype=jnp.bfloat16` (compute) or `remat=True`.
  Returns a Flax module (`CVVAE` or `ImageVAE`) and its `params` pytree (float32 arrays).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such model path: {path}")
  if convert.is_torch_folder(path):
    return convert.load_torch_folder(path, **overrides)
  if is_flax_export(path):
    return load_flax(path, **overrides)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    from cvvae_jax import checkpoint  # training workdirs; imported lazily (pulls in the training stack)

    return checkpoint.load_model_from_workdir(path, **overrides)
  raise ValueError(f"{path} is not a model: expected an original PyTorch folder ({convert.CONFIG_NAME} + "
                   f"{convert.WEIGHTS_NAME}), our Flax export ({MODEL_JSON} + {PARAMS_DIR}/) or a training "
                   f"workdir with checkpoints/; found {sorted(os.listdir(path))[:10] if os.path.isdir(path) else 'a file'}")


def save_pretrained(model, params, out_dir: str) -> str:
  """Writes the original PyTorch folder layout (config.json + diffusion_pytorch_model.safetensors)."""
  return convert.save_torch_folder(model, params, out_dir)
