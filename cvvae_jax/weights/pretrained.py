"""Loading and saving whole models: `load_pretrained`, `save_pretrained`, and our Flax format (`save_flax`).

Formats `load_pretrained(path)` accepts (`path` a local path or a Hugging Face Hub id, see `hub.py`):
  * an original PyTorch folder: `config.json` + `diffusion_pytorch_model.safetensors` of `CVVAEModel` (SD2.1
    CV-VAE), `CVVAESD3Model` (SD3 CV-VAE) or diffusers `AutoencoderKL` (SD image VAE); float32, float16 or
    bfloat16, one file or shards with an index, variants such as `diffusion_pytorch_model.fp16.safetensors`
    (`weight_files.py`);
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
from cvvae_jax.weights import hub, torch_format, workdir

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


def load_pretrained(path: str, *, subfolder: str | None = None, revision: str | None = None,
                    variant: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                    **overrides):
  """Loads `(model, params)` from an original PyTorch folder, our Flax export, or a training workdir.

  `path` is a local path or a Hub id (`"AILab-CVC/CV-VAE", subfolder="vae3d_sd3", revision=...`; `cache_dir`,
  `local_files_only` and `HF_HUB_OFFLINE` as in `huggingface_hub`; a local path always wins, see `hub.py`).
  `variant="fp16"` reads `diffusion_pytorch_model.fp16.safetensors` of an original folder. `overrides` set run-time
  model fields, e.g. `dtype=jnp.bfloat16` (compute), `param_dtype=jnp.bfloat16` (the params') or `remat=True`.
  Returns a Flax module (`CVVAE` or `ImageVAE`) and its `params` pytree (float32 arrays unless `param_dtype`).
  """
  path = hub.resolve_model_path(path, subfolder=subfolder, revision=revision, variant=variant, cache_dir=cache_dir,
                                local_files_only=local_files_only)
  if "param_dtype" in overrides:
    overrides["param_dtype"] = registry.parse_param_dtype(overrides["param_dtype"])
  if not paths.path(path).exists():
    raise FileNotFoundError(f"no such model path: {path}")
  if torch_format.is_torch_folder(path):
    return torch_format.load_torch_folder(path, variant=variant, **overrides)
  if _is_remote_torch_folder(path):
    return _load_remote_torch_folder(path, variant=variant, **overrides)
  if variant is not None:
    raise ValueError(f"variant={variant!r} picks a weights file of an original PyTorch folder; {path} is not one")
  if is_flax_export(path):
    return load_flax(path, **overrides)
  if workdir.is_workdir(path):
    return workdir.load_model_from_workdir(path, **overrides)
  found = sorted(p.name for p in paths.path(path).iterdir())[:10] if paths.path(path).is_dir() else "a file"
  raise ValueError(f"{path} is not a model: expected an original PyTorch folder ({torch_format.CONFIG_NAME} + "
                   f"{torch_format.WEIGHTS_NAME}), our Flax export ({MODEL_JSON} + {PARAMS_DIR}/) or a training "
                   f"workdir with {workdir.CHECKPOINTS_DIR}/; found {found}")


def _remote_torch_files(root) -> list:
  """config.json and the weight files (any variant, shards and their index) of an original folder on a bucket."""
  return [f for f in root.iterdir() if f.name == torch_format.CONFIG_NAME
          or (f.name.startswith("diffusion_pytorch_model") and f.name.endswith((".safetensors", ".json")))]


def _is_remote_torch_folder(path: str) -> bool:
  if not paths.is_remote(path):
    return False
  names = {f.name for f in _remote_torch_files(paths.path(path))}
  return torch_format.CONFIG_NAME in names and any(n.endswith(".safetensors") for n in names)


def _load_remote_torch_folder(path: str, **kwargs):
  """An original PyTorch folder on a bucket: its config and weight files copied to a local temporary folder, then
  loaded as a local one."""
  with tempfile.TemporaryDirectory(prefix="cvvae_torch_") as local:
    for remote in _remote_torch_files(paths.path(path)):
      with open(os.path.join(local, remote.name), "wb") as f:
        f.write(remote.read_bytes())
    return torch_format.load_torch_folder(local, **kwargs)  # arrays converted (copied) from the files


def save_pretrained(model, params, out_dir: str, *, dtype=None, variant: str | None = None) -> str:
  """Writes the original PyTorch folder layout (config.json + diffusion_pytorch_model.safetensors).

  `dtype` ("float16"/"fp16", "bfloat16"/"bf16", a dtype; None: float32) is that of the written tensors;
  `variant="fp16"` names the file `diffusion_pytorch_model.fp16.safetensors` (diffusers' variants)."""
  return torch_format.save_torch_folder(model, params, out_dir, dtype=dtype, variant=variant)
