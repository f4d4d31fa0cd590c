"""The static choices of the convolution code: how an axis pads (`Pad`), which algorithm computes a convolution
(`ConvImpl`) and a nearest-2x upsampling convolution (`UpsampleImpl`), and what `auto` means on a platform.

Models hold the choice as a string field (`conv_impl`, `upsample_impl`: JSON- and config-friendly, run-time fields
like `dtype`); `resolve_conv_impl(name, platform)` / `resolve_upsample_impl(name, platform)` parse it once into the
enum, `auto` resolved for `platform` ("cpu", "gpu", "tpu", ...; None: `jax.default_backend()` at the call).

    resolve_conv_impl("auto", "tpu")  # ConvImpl.XLA
    resolve_conv_impl("auto", "cpu")  # ConvImpl.CPU
"""
from __future__ import annotations

import enum

import jax


class Pad(enum.Enum):
  """How a convolution pads one axis."""

  ZEROS = "zeros"
  REPLICATE = "replicate"


class ConvImpl(enum.Enum):
  """How a 3D convolution with more than one time tap is computed (others are one `lax.conv_general_dilated`).

  XLA: `lax.conv_general_dilated` in 3D (TPU, GPU). The CPU forms (`cpu_conv.py`) compute it from 2D convolutions
  of frames, with derived kernels tied to their layer's input: CPU_TAPS one batched 2D convolution per time tap,
  CPU_FRAMES one output frame at a time, CPU the frame loop for frames of at least `FRAME_LOOP_MIN_PIXELS` and the
  taps below (the fastest on XLA:CPU, bench/README.md section 2.5).
  """

  AUTO = "auto"
  XLA = "xla"
  CPU = "cpu"
  CPU_TAPS = "cpu_taps"
  CPU_FRAMES = "cpu_frames"


class UpsampleImpl(enum.Enum):
  """How nearest-2x upsampling followed by a 3x3 convolution is computed.

  XLA: the upsampled copy (`jnp.repeat`), then the convolution. SUBPIXEL: four 2x2 convolutions of the low-resolution
  input, interleaved (16/36 of the multiply-adds, no 4x copy; measured faster on XLA:CPU, bench/README.md 2.1).
  """

  AUTO = "auto"
  XLA = "xla"
  SUBPIXEL = "subpixel"


CONV_IMPLS = tuple(i.value for i in ConvImpl)
UPSAMPLE_IMPLS = tuple(i.value for i in UpsampleImpl)


def _parse(enum_cls, value, field: str):
  if isinstance(value, enum_cls):
    return value
  try:
    return enum_cls(value)
  except ValueError:
    raise ValueError(f"{field}: expected one of {[i.value for i in enum_cls]}, got {value!r}") from None


def _platform(platform: str | None) -> str:
  return (platform or jax.default_backend()).lower()


def resolve_conv_impl(impl: str | ConvImpl, platform: str | None = None) -> ConvImpl:
  """`impl` as a `ConvImpl`, `auto` resolved: the CPU forms (`ConvImpl.CPU`) on "cpu", `ConvImpl.XLA` elsewhere."""
  impl = _parse(ConvImpl, impl, "conv_impl")
  if impl is not ConvImpl.AUTO:
    return impl
  return ConvImpl.CPU if _platform(platform) == "cpu" else ConvImpl.XLA


def resolve_upsample_impl(impl: str | UpsampleImpl, platform: str | None = None) -> UpsampleImpl:
  """`impl` as an `UpsampleImpl`, `auto` resolved: SUBPIXEL on "cpu" (where it is measured to pay), XLA elsewhere."""
  impl = _parse(UpsampleImpl, impl, "upsample_impl")
  if impl is not UpsampleImpl.AUTO:
    return impl
  return UpsampleImpl.SUBPIXEL if _platform(platform) == "cpu" else UpsampleImpl.XLA
