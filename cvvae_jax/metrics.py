"""Reconstruction metrics: PSNR and SSIM per frame (jittable JAX) and their summaries over a set (numpy).

Range convention. Our videos live in [-1, 1]; the paper (as is usual) reports PSNR/SSIM on [0, 1] images
(equivalently uint8 images with data range 255). So :func:`psnr` and :func:`ssim` take [-1, 1] inputs,
map them to [0, 1] by ``(x + 1) / 2``, clip to [0, 1] (what saving the frames as images would do; turn off
with ``clip=False``) and use data range 1. PSNR is invariant to this affine map, SSIM is not (its
luminance term depends on the mean), which is why the conversion is fixed here rather than left to
callers.

SSIM is the Wang et al. (2004) definition with the settings of the paper's and most VAE evaluations, and
of scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)``: an 11x11 Gaussian window (sigma 1.5,
truncated at 3.5 sigma, normalised), K1 = 0.01, K2 = 0.03, population (co)variances, the SSIM map over
the "valid" region (the window inside the image, i.e. 5 pixels cropped at each border), averaged over
space and then over channels. ``tests/test_metrics.py`` checks both against scikit-image within 1e-4.

All per-image functions accept any leading shape: images ``[B, H, W, C]`` give ``[B]``, videos
``[B, T, H, W, C]`` give ``[B, T]`` (per frame).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 1.0  # after mapping [-1, 1] -> [0, 1]
Z_95 = 1.96


def to_unit_range(x: jax.Array, clip: bool = True) -> jax.Array:
  """Maps values from [-1, 1] to [0, 1] in float32; ``clip`` clamps to [0, 1]. Any shape."""
  x = (x.astype(jnp.float32) + 1.0) * 0.5
  return jnp.clip(x, 0.0, 1.0) if clip else x


def _check_pair(x: jax.Array, y: jax.Array, min_size: int = 1) -> None:
  if x.shape != y.shape:
    raise ValueError(f"expected x and y of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
  if x.ndim < 3:
    raise ValueError(f"expected [..., H, W, C] images, got shape {tuple(x.shape)}")
  if min(x.shape[-3], x.shape[-2]) < min_size:
    raise ValueError(f"expected H, W >= {min_size}, got H={x.shape[-3]}, W={x.shape[-2]}")


def psnr(x: jax.Array, y: jax.Array, *, clip: bool = True,
         axis: Sequence[int] = (-3, -2, -1)) -> jax.Array:
  """Peak signal-to-noise ratio in dB, per image (or over the axes `axis`, e.g. per clip or over a video).

  Args:
    x, y: ``[..., H, W, C]`` in [-1, 1] (reference and reconstruction; PSNR is symmetric).
    clip: clip to the valid range after mapping to [0, 1] (see module docstring).
    axis: the axes the mean squared error runs over: H, W, C by default.

  Returns:
    ``[...]`` float32: ``10 log10(1 / MSE)`` with the MSE of the [0, 1] images; ``inf`` for identical images.
  """
  _check_pair(x, y)
  a, b = to_unit_range(x, clip), to_unit_range(y, clip)
  mse = jnp.mean(jnp.square(a - b), axis=tuple(axis))
  return 10.0 * jnp.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Normalised 1-D Gaussian taps ``[size]`` centred on ``size // 2`` (as scipy's gaussian_filter)."""
  k = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (k / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter_valid(maps: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable "valid" Gaussian filter of ``[N, H, W, C]`` maps, per channel -> ``[N, H-10, W-10, C]``."""
  c = maps.shape[-1]
  size = taps.shape[0]
  dn = ("NHWC", "HWIO", "NHWC")
  k_h = jnp.tile(jnp.asarray(taps).reshape(size, 1, 1, 1), (1, 1, 1, c))
  k_w = jnp.tile(jnp.asarray(taps).reshape(1, size, 1, 1), (1, 1, 1, c))
  out = jax.lax.conv_general_dilated(maps, k_h, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.conv_general_dilated(out, k_w, (1, 1), "VALID", dimension_numbers=dn,
                                      feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def ssim(x: jax.Array, y: jax.Array, *, clip: bool = True) -> jax.Array:
  """Structural similarity per image (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03).

  Args:
    x, y: ``[..., H, W, C]`` in [-1, 1], ``H, W >= 11``.
    clip: clip to the valid range after mapping to [0, 1] (see module docstring).

  Returns:
    ``[...]`` float32 SSIM in [-1, 1] (1 for identical images), computed on [0, 1] images with data
    range 1, averaged over the valid region and the channels.
  """
  _check_pair(x, y, min_size=SSIM_WINDOW)
  lead = x.shape[:-3]
  h, w, c = x.shape[-3:]
  a = to_unit_range(x, clip).reshape((-1, h, w, c))
  b = to_unit_range(y, clip).reshape((-1, h, w, c))
  # Filter the five moment maps in one grouped convolution: [N, H, W, 5C].
  stats = _filter_valid(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1),
                        gaussian_window())
  mu_a, mu_b, e_aa, e_bb, e_ab = jnp.split(stats, 5, axis=-1)
  var_a = e_aa - mu_a * mu_a
  var_b = e_bb - mu_b * mu_b
  cov = e_ab - mu_a * mu_b
  c1 = (SSIM_K1 * DATA_RANGE) ** 2
  c2 = (SSIM_K2 * DATA_RANGE) ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3)).reshape(lead)


# --------------------------------------------------------------------------------------------------
# Summaries over a set (host side, numpy).
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean of ``n`` per-clip values and the half-width of its 95% confidence interval.

  ``ci95 = 1.96 * std / sqrt(n)`` with the sample standard deviation (ddof 1); ``nan`` when ``n == 1``.
  """

  mean: float
  ci95: float
  n: int

  def __str__(self) -> str:
    return f"{self.mean:.4f} ± {self.ci95:.4f} (n={self.n})"


def summarize(values: Union[Sequence[float], np.ndarray]) -> Summary:
  """:class:`Summary` of a 1-D set of per-clip (or per-image) values."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"expected a non-empty 1-D set of values, got shape {v.shape}")
  n = int(v.size)
  ci = Z_95 * float(np.std(v, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
  return Summary(mean=float(np.mean(v)), ci95=ci, n=n)


def clip_means(per_frame: Union[np.ndarray, Iterable[np.ndarray]]) -> np.ndarray:
  """Per-clip means over frames: ``[N, T]`` (or N arrays ``[T_i]`` of varying length) -> ``[N]``."""
  if isinstance(per_frame, (np.ndarray, jax.Array)):
    arr = np.asarray(per_frame, dtype=np.float64)
    if arr.ndim != 2:
      raise ValueError(f"expected per-frame values [N, T], got shape {arr.shape}")
    return arr.mean(axis=1)
  means = []
  for i, frames in enumerate(per_frame):
    c = np.asarray(frames, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
      raise ValueError(f"expected clip {i} as non-empty per-frame values [T], got shape {c.shape}")
    means.append(c.mean())
  return np.asarray(means)


def summarize_clips(per_frame: Union[np.ndarray, Iterable[np.ndarray]]) -> Summary:
  """Averages each clip over its frames, then summarises over clips (mean ± 95% CI)."""
  return summarize(clip_means(per_frame))
