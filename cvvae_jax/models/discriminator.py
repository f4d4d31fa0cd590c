"""The 3D PatchGAN discriminator of CV-VAE training.

Structure of the original's ``NLayerDiscriminator3D`` as the released training config builds it
(AILab-CVC/CV-VAE ``configs/cvvae_sd3_constraint_training.yaml``: ``ndf=64, n_layers=4, use_actnorm=False,
causal=False, half_3d=False``; code in ``lvdm/modules/autoencoding/lpips/model/model.py``), written as
channels-last Flax. With ``c(n) = ndf * min(2**n, 8)``:

  conv_in    3D conv 3x3x3, stride 2 (T, H, W), zero padding 1, ``3 -> c(0)``; LeakyReLU(0.2)
  block_i    for n = 1 .. n_layers - 2: res block ``c(n-1) -> c(n)`` with 2x average-pool downsampling,
             then GroupNorm, LeakyReLU(0.2)
             then twice: res block ``-> c(n_layers)`` without downsampling, GroupNorm, LeakyReLU(0.2)
  conv_out   3D conv 3x3x3, stride 1, zero padding 1, ``-> 1`` (patch logits)

Res block (``ResBlockDown3D``): GroupNorm -> SiLU -> conv1 (3x3x3, zero pad 1) -> [downsample] ->
GroupNorm -> SiLU -> conv2 (3x3x3) plus a shortcut ([downsample], then a 1x1x1 conv when channels
change). Downsampling is ``avg_pool`` 2x2x2 / stride 2 (floor in H and W), after duplicating the first
frame when T is odd, so T -> ceil(T / 2). GroupNorm: 32 groups, eps 1e-5, over (T, H, W, channels in
group). The original's res blocks also hold an unused ``temb_proj`` Linear (no time embedding is ever
passed); we leave it out.

Frames and images. No special padding is needed for T = 1: the stride-2 ``conv_in`` with zero padding
maps T = 1 to 1 (the frame sits in the centre tap, the outer taps see zeros), and each down block
duplicates the single frame before pooling time, giving 1 again. A 4D image batch ``[B, H, W, 3]`` is
taken as 1-frame clips. Time maps 1 -> 1, 9 -> 5 -> 3 -> 2, 17 -> 9 -> 5 -> 3 (n_layers = 4).

Initialisation as the original's ``weights_init``: conv kernels N(0, 0.02); conv biases keep PyTorch's
default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GroupNorm scale 1, bias 0. Parameters are float32; convs run
in ``dtype``; norms and the returned logits are float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvvae_jax.models import layers, remat as remat_lib


def channel_plan(ndf: int, n_layers: int) -> list[tuple[int, bool]]:
  """``(out_channels, downsample)`` of each res block, in order (``conv_in`` gives ``ndf``)."""
  if n_layers < 1:
    raise ValueError(f"expected n_layers >= 1, got {n_layers}")
  plan = [(ndf * min(2**n, 8), True) for n in range(1, n_layers - 1)]
  plan += [(ndf * min(2**n_layers, 8), False)] * 2
  return plan


def patch_grid(t: int, h: int, w: int, n_layers: int) -> tuple[int, int, int]:
  """Output ``(T', H', W')`` of the discriminator for an input of ``T x H x W`` frames."""
  t, h, w = (t - 1) // 2 + 1, (h - 1) // 2 + 1, (w - 1) // 2 + 1  # conv_in: k3, s2, p1
  for _ in range(max(n_layers - 2, 0)):
    t, h, w = (t + 1) // 2, h // 2, w // 2
  return t, h, w


def _torch_bias_init(fan_in: int):
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv3D(nn.Module):
  """3D conv on ``[B, T, H, W, C]``, zero padding, kernel N(0, init_std), PyTorch-style bias init."""

  features: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1
  init_std: float = 0.02
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # the convolution algorithm, `conv_impl.ConvImpl` by name

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * self.kernel**3
    pad = ((self.padding, self.padding, layers.Pad.ZEROS),) * 3
    return layers.Conv(self.features, (self.kernel,) * 3, strides=(self.stride,) * 3, padding=pad,
                       dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=nn.initializers.normal(stddev=self.init_std),
                       bias_init=_torch_bias_init(fan_in), conv_impl=self.conv_impl, name="conv")(x.astype(self.dtype))


class GroupNorm32(nn.Module):
  """GroupNorm over (T, H, W, channels in group) of ``[B, T, H, W, C]``, computed in float32."""

  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] % self.num_groups:
      raise ValueError(f"expected channels divisible by {self.num_groups} groups, got {x.shape[-1]}")
    return nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, dtype=jnp.float32,
                        param_dtype=jnp.float32, name="norm")(x.astype(jnp.float32))


def downsample_2x(x: jax.Array) -> jax.Array:
  """``[B, T, H, W, C] -> [B, ceil(T/2), H//2, W//2, C]``: 2x2x2 mean, first frame duplicated if T odd."""
  if x.shape[1] % 2:
    x = jnp.concatenate([x[:, :1], x], axis=1)
  return nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")


class ResBlockDown3D(nn.Module):
  """Res block of the discriminator, ``[B, T, H, W, C_in] -> [B, T', H', W', features]``."""

  features: int
  downsample: bool
  num_groups: int = 32
  epsilon: float = 1e-5
  init_std: float = 0.02
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(init_std=self.init_std, dtype=self.dtype, conv_impl=self.conv_impl)
    h = nn.silu(GroupNorm32(self.num_groups, self.epsilon, name="norm1")(x))
    h = Conv3D(self.features, name="conv1", **conv)(h)
    if self.downsample:
      h = downsample_2x(h)
    h = nn.silu(GroupNorm32(self.num_groups, self.epsilon, name="norm2")(h))
    h = Conv3D(self.features, name="conv2", **conv)(h)
    if self.downsample:
      x = downsample_2x(x)
    if x.shape[-1] != self.features:
      x = Conv3D(self.features, kernel=1, padding=0, name="shortcut", **conv)(x)
    return x.astype(h.dtype) + h


class PatchDiscriminator3D(nn.Module):
  """3D PatchGAN discriminator: video ``[B, T, H, W, 3]`` in [-1, 1] -> logits ``[B, T', H', W', 1]``.

  A 4D image batch ``[B, H, W, 3]`` is treated as T = 1. ``(T', H', W') = patch_grid(T, H, W,
  n_layers)``; the logits are float32. Defaults are the released CV-VAE training config.
  """

  ndf: int = 64
  n_layers: int = 4
  num_groups: int = 32
  epsilon: float = 1e-5
  negative_slope: float = 0.2
  init_std: float = 0.02
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # the convolution algorithm ("auto": `xla` on TPU/GPU, the CPU forms on CPU)
  remat: Any = "none"  # a policy of `remat.py`; the `full` ones recompute each res block in the backward pass

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 4:
      x = x[:, None]
    if x.ndim != 5:
      raise ValueError(f"expected video [B, T, H, W, C] or images [B, H, W, C], got {tuple(x.shape)}")
    grid = patch_grid(*x.shape[1:4], self.n_layers)
    if min(grid) < 1:
      raise ValueError(f"expected frames large enough for {self.n_layers} layers, got T, H, W = "
                       f"{tuple(x.shape[1:4])} (output grid would be {grid})")
    conv = dict(init_std=self.init_std, dtype=self.dtype, conv_impl=self.conv_impl)
    h = Conv3D(self.ndf, stride=2, name="conv_in", **conv)(x)
    h = nn.leaky_relu(h, self.negative_slope)
    block_cls = remat_lib.module(ResBlockDown3D, self.remat, "discriminator")
    for i, (features, down) in enumerate(channel_plan(self.ndf, self.n_layers)):
      h = block_cls(features, down, self.num_groups, self.epsilon, name=f"block_{i}", **conv)(h)
      h = GroupNorm32(self.num_groups, self.epsilon, name=f"norm_{i}")(h)
      h = nn.leaky_relu(h, self.negative_slope)
    logits = Conv3D(1, name="conv_out", **conv)(h)
    return logits.astype(jnp.float32)
