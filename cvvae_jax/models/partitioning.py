"""Where a model's activations live on a device mesh: the static `activation_sharding` field of the autoencoders.

`ActivationSharding(mesh, batch_axes, spatial_axis)` says that activations keep their batch dimension split over
`batch_axes` and their **height** split over `spatial_axis` (the trainer's `mesh.spatial`, `train/sharding.py`):
video `[B, T, H, W, C]` as `P(batch_axes, None, spatial_axis)`, images `[B, H, W, C]` as
`P(batch_axes, spatial_axis)`. The encoder and decoder apply it (`constrain`, a `jax.lax.with_sharding_constraint`)
at every level boundary (after conv_in, each res block, each resampler, the mid block, the output), so that XLA's
SPMD partitioner keeps one clip split over the spatial devices all the way through: convolutions exchange
one-row halos with their neighbours, and GroupNorm's mean over (T, H, W) becomes a local sum plus an all-reduce over
the axis, inserted by XLA. None (the default) adds nothing: the program is the one without a mesh.

Why height, not width: channels-last arrays `[..., H, W, C]` split on H give each device whole contiguous rows
(`W * C` elements each, one contiguous block per frame), so the halo of a 3x3 convolution is one row of `W * C`
contiguous elements; a split on W gives `H` strided pieces per halo and per frame. Height also splits at the same
point at every level (rows `[k H / K, (k + 1) H / K)` of every resolution), so no level needs to move data.

Attention at the latent resolution (the mid block's spatial attention, over all `h * w` latent pixels of a frame)
needs every key of a frame on each device. Left height-split (`gather_attention=False`, the default), XLA gathers
what the attention needs itself; `gather_attention=True` replicates the height before it explicitly and splits it
again after. Measured (`bench/spatial_attention.py`, SD2.1 CV-VAE loss + gradients, 5x128x128 clip, bf16, full remat,
4 devices): the two compiled programs have the same per-device temporaries (1.154 GiB) and FLOPs (1.493 TFLOP), so
the default adds no constraint of its own there and lets XLA choose; the field stays for platforms where it differs.
"""
from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """The mesh axes of the batch and of the height of every activation (static, hashable).

  Attributes:
    mesh: the device mesh the program runs on (the jit's mesh).
    batch_axes: mesh axes the batch dimension is split over (the trainer's `("data", "fsdp")`).
    spatial_axis: mesh axis the height is split over (`"spatial"`).
    gather_attention: replicate the height before the mid-block attention (see the module docstring).
  """

  mesh: Mesh
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  spatial_axis: str = "spatial"
  gather_attention: bool = False

  def __post_init__(self):
    missing = [a for a in (*self.batch_axes, self.spatial_axis) if a not in self.mesh.shape]
    if missing:
      raise ValueError(f"ActivationSharding: axes {missing} are not axes of the mesh {tuple(self.mesh.shape)}")

  @property
  def spatial_size(self) -> int:
    return self.mesh.shape[self.spatial_axis]

  def spec(self, shape: tuple[int, ...], split_height: bool = True) -> P:
    """The PartitionSpec of an activation of `shape` (`[B, T, H, W, C]` or `[B, H, W, C]`).

    A dimension the axes do not divide (e.g. a probe batch of 2 on 8 batch devices) is left to XLA
    (`P.UNCONSTRAINED`), so the same model also runs on other shapes.
    """
    if len(shape) not in (4, 5):
      raise ValueError(f"ActivationSharding: expected an activation [B, T, H, W, C] or [B, H, W, C], got {shape}")
    batch_devices = math.prod(self.mesh.shape[a] for a in self.batch_axes)
    batch = self.batch_axes if shape[0] % batch_devices == 0 else P.UNCONSTRAINED
    h = len(shape) - 3
    height = self.spatial_axis if shape[h] % self.spatial_size == 0 else P.UNCONSTRAINED
    if not split_height:
      height = None
    return P(batch, *([None] * (h - 1)), height, None, None)

  def constrain(self, x: Array, split_height: bool = True) -> Array:
    """`x` with its batch and height (or, with `split_height=False`, the batch only) split as `spec` says."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x.shape, split_height)))


def constrain(x: Array, sharding: ActivationSharding | None, split_height: bool = True) -> Array:
  """`sharding.constrain(x)`, or `x` itself without an activation sharding."""
  return x if sharding is None else sharding.constrain(x, split_height)


def gather_at_use(param: Array, sharding: ActivationSharding | None) -> Array:
  """A layer's parameter (a kernel) gathered whole on every device where the layer uses it, with an activation
  sharding (the trainer's spatial mesh: parameters split over `fsdp x spatial`); `param` itself without one.

  The layers call it on their kernels, so under remat a unit gathers its kernels inside its recomputed function: the
  backward pass gathers them again instead of keeping a full copy of every kernel alive from the forward pass
  (measured: one copy gathered at the start of the step cost 0.36 GiB more per device on the SD2.1 CV-VAE's
  `spatial=8` step, `bench/README_train.md`). Replicated kernels also avoid an XLA SPMD partitioner bug in the
  backward pass of convolutions whose kernel and input are both split (`train/sharding.py:params_at_use`).
  """
  if sharding is None:
    return param
  return jax.lax.with_sharding_constraint(param, NamedSharding(sharding.mesh, P()))
