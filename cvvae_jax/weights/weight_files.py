"""Weight files of the original PyTorch folder layout: which file a folder holds, reading it, writing it.

What a folder may hold (the names diffusers writes and reads; `variant` e.g. "fp16" or "bf16"):
  * one file, `diffusion_pytorch_model.safetensors` (a variant: `diffusion_pytorch_model.fp16.safetensors`);
  * shards listed in an index, `diffusion_pytorch_model.safetensors.index.json` (a variant:
    `diffusion_pytorch_model.safetensors.index.fp16.json`), `{"weight_map": {tensor name: shard file}}`;
  * PyTorch pickles (`diffusion_pytorch_model.bin`, `pytorch_model.bin`, ...): refused with an error naming the
    file; they are never unpickled (unpickling runs code from the file).

Tensors may be float32, float16 or bfloat16 (`safetensors.numpy` reads bfloat16 as `ml_dtypes.bfloat16`, 0.8.0 and
later); anything else, a truncated or corrupt file, a shard missing or holding other tensors than the index says is
an error naming the file.

    found = find_weights(folder, variant=None)       # -> WeightFiles(index or None, files)
    state_dict = read_state_dict(found)              # {torch name: numpy array}
    write_state_dict(state_dict, folder, dtype=np.float16, variant="fp16")
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from cvvae_jax.weights.convert import ConversionError

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "PICKLE_NAMES", "SAVE_DTYPES", "WeightFiles", "weights_name", "index_name",
           "check_variant", "has_weights", "find_weights", "read_state_dict", "write_state_dict", "parse_save_dtype"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                "pytorch_model.bin.index.json", "diffusion_pytorch_model.ckpt", "model.ckpt",
                "diffusion_pytorch_model.pt")
READ_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# The dtypes `write_state_dict` writes, by name.
SAVE_DTYPES = {"float32": np.dtype(np.float32), "fp32": np.dtype(np.float32), "float16": np.dtype(np.float16),
               "fp16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "bf16": np.dtype(ml_dtypes.bfloat16)}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch zip / raw pickle


def check_variant(variant: str | None) -> None:
  if variant is not None and (not isinstance(variant, str) or not variant or any(c in variant for c in "./-")):
    raise ValueError(f"variant: expected a name such as 'fp16' or 'bf16' (or None), got {variant!r}")


def weights_name(variant: str | None = None) -> str:
  """`diffusion_pytorch_model.safetensors`, or with a variant `diffusion_pytorch_model.<variant>.safetensors`."""
  return WEIGHTS_NAME if variant is None else f"diffusion_pytorch_model.{variant}.safetensors"


def index_name(variant: str | None = None) -> str:
  """The shard index: `diffusion_pytorch_model.safetensors.index[.<variant>].json` (diffusers' naming)."""
  return INDEX_NAME if variant is None else f"diffusion_pytorch_model.safetensors.index.{variant}.json"


@dataclasses.dataclass(frozen=True)
class WeightFiles:
  """The weights of one folder: `files` (absolute paths, in index order), `index` the shard index or None."""

  index: str | None
  files: tuple[str, ...]

  @property
  def name(self) -> str:
    return self.index or self.files[0]


def _variants(folder: str) -> list[str]:
  """The variants a folder holds ("(none)" for the plain file), from its file names."""
  return variants_of(os.listdir(folder))


def variants_of(names) -> list[str]:
  """The variants among file names ("(none)" for the plain file), e.g. of a folder or of a Hub repo's listing."""
  found = set()
  for name in names:
    if name in (WEIGHTS_NAME, INDEX_NAME):
      found.add("(none)")
    elif name.startswith("diffusion_pytorch_model.") and name.endswith(".safetensors"):
      middle = name[len("diffusion_pytorch_model."):-len(".safetensors")]
      if "-" not in middle:
        found.add(middle)
    elif name.startswith("diffusion_pytorch_model.safetensors.index.") and name.endswith(".json"):
      found.add(name[len("diffusion_pytorch_model.safetensors.index."):-len(".json")])
  return sorted(found)


def _pickles(folder: str) -> list[str]:
  return [os.path.join(folder, n) for n in PICKLE_NAMES if os.path.isfile(os.path.join(folder, n))]


def has_weights(folder: str) -> bool:
  """Whether `folder` holds a weights file of any kind this module knows (safetensors, shards, pickles)."""
  return os.path.isdir(folder) and (bool(_variants(folder)) or bool(_pickles(folder)))


def _refuse_pickle(path: str) -> None:
  raise ValueError(f"{path} is a PyTorch pickle; pickles are never loaded here (unpickling runs code from the file). "
                   f"Expected safetensors ({WEIGHTS_NAME}); convert it where you trust the file, e.g. with diffusers: "
                   "`AutoencoderKL.from_pretrained(folder).save_pretrained(folder)` (writes safetensors)")


def find_weights(folder: str, variant: str | None = None) -> WeightFiles:
  """The weights file(s) of `folder` for `variant` (None: the plain `diffusion_pytorch_model.safetensors`).

  Raises FileNotFoundError when there are none (naming the variants that are there), ValueError for a folder with
  PyTorch pickles only, or with both a single file and a shard index of the same variant.
  """
  check_variant(variant)
  single, index = os.path.join(folder, weights_name(variant)), os.path.join(folder, index_name(variant))
  if os.path.isfile(single) and os.path.isfile(index):
    raise ValueError(f"{folder} holds both {os.path.basename(single)} and the shard index {os.path.basename(index)};"
                     " expected one of them (remove the stale one)")
  if os.path.isfile(single):
    return WeightFiles(None, (single,))
  if os.path.isfile(index):
    return WeightFiles(index, _shards(index))
  others = [v for v in _variants(folder) if v != (variant or "(none)")]
  if not others and (pickles := _pickles(folder)):
    _refuse_pickle(pickles[0])
  hint = f"; it holds the variant(s) {others} (pass variant=...)" if others else ""
  raise FileNotFoundError(f"expected {os.path.basename(single)} or its shard index {os.path.basename(index)} in "
                          f"{folder}{hint}")


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _shards(index_path: str) -> tuple[str, ...]:
  index = _read_json(index_path)
  weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
  if not isinstance(weight_map, Mapping) or not weight_map or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ValueError(f"{index_path}: expected a shard index {{\"weight_map\": {{tensor name: shard file}}}}, got "
                     f"{str(index)[:200]}")
  folder = os.path.dirname(index_path)
  files = []
  for name in dict.fromkeys(weight_map.values()):
    if os.path.basename(name) != name:
      raise ValueError(f"{index_path}: expected shard file names inside the folder, got {name!r}")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{index_path} lists the shard {name}, which is missing from {folder}")
    files.append(path)
  return tuple(files)


def _read_file(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(_PICKLE_MAGIC):
    _refuse_pickle(path)
  try:
    state_dict = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e
  bad = [f"{k}: {v.dtype}" for k, v in state_dict.items() if v.dtype not in READ_DTYPES]
  if bad:
    raise ConversionError(f"{path}: expected float32, float16 or bfloat16 tensors, got " + ", ".join(sorted(bad)))
  return state_dict


def read_state_dict(found: WeightFiles) -> dict[str, np.ndarray]:
  """All tensors of `found` (torch names, numpy arrays in the file's dtype). Strict for shards: each shard must hold
  exactly the tensors the index assigns to it."""
  if found.index is None:
    return _read_file(found.files[0])
  weight_map = _read_json(found.index)["weight_map"]
  out: dict[str, np.ndarray] = {}
  for path in found.files:
    part = _read_file(path)
    name = os.path.basename(path)
    listed = {k for k, v in weight_map.items() if v == name}
    problems = []
    if missing := sorted(listed - set(part)):
      problems.append(f"the index assigns {missing[:5]}{' ...' if len(missing) > 5 else ''} to it, but it lacks them")
    if extra := sorted(set(part) - listed):
      problems.append(f"it holds {extra[:5]}{' ...' if len(extra) > 5 else ''}, which the index assigns elsewhere "
                      "or not at all")
    if problems:
      raise ConversionError(f"shard {path} does not match {found.index}: " + "; ".join(problems))
    out.update(part)
  return out


def parse_save_dtype(dtype: Any) -> np.dtype:
  """A dtype to write (name as in `SAVE_DTYPES`, numpy/jax dtype, or None: float32) -> numpy dtype."""
  if dtype is None:
    return np.dtype(np.float32)
  if isinstance(dtype, str):
    if dtype not in SAVE_DTYPES:
      raise ValueError(f"dtype: expected one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    return SAVE_DTYPES[dtype]
  try:
    parsed = np.dtype(dtype)
  except TypeError:
    parsed = None
  if parsed not in READ_DTYPES:
    raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
  return parsed


def write_state_dict(state_dict: Mapping[str, np.ndarray], folder: str, dtype: Any = None,
                     variant: str | None = None) -> str:
  """Writes `state_dict` (float32 numpy arrays) as one safetensors file of `dtype` (rounded to nearest even) named
  for `variant`, atomically; a stale shard index of the same variant (and its shards) is removed. Returns the path."""
  dtype = parse_save_dtype(dtype)
  check_variant(variant)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, weights_name(variant))
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(np.asarray(v).astype(dtype)) for k, v in state_dict.items()}, tmp,
            metadata={"format": "pt"})
  stale = os.path.join(folder, index_name(variant))
  if os.path.isfile(stale):
    for shard in _shards(stale):
      os.remove(shard)
    os.remove(stale)
  os.replace(tmp, path)
  return path
