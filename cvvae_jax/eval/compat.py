"""Latent-compatibility statistics, host side in float64: how far the CV-VAE's latents lie from the image VAE's.

The paper's claim is that CV-VAE's latents stay in the image VAE's latent distribution, so that a text-to-image
model's decoder reads them. Per latent channel, over every latent position of every clip:
  * the CV-VAE's latents (posterior means, one per latent frame) and the image VAE's latents of the frames those
    latent frames stand for under psi `slice` (frames 0, 4, 8, ...), and of every frame for reference;
  * their means and standard deviations, and the KL divergence between the two per-channel Gaussians,
    KL(N(m_cv, s_cv^2) || N(m_img, s_img^2)) = log(s_img / s_cv) + (s_cv^2 + (m_cv - m_img)^2) / (2 s_img^2) - 1/2.
Raw (unscaled) latents: the latent regularizer trains the CV-VAE's raw latent toward the image VAE's.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cvvae_jax.models.psi import TEMPORAL_COMPRESSION


class ChannelStats:
  """Per-channel count, sum and sum of squares of latents `[..., C]`, accumulated in float64."""

  def __init__(self):
    self.count = 0
    self.sum: np.ndarray | None = None
    self.sumsq: np.ndarray | None = None

  def add(self, latents: np.ndarray) -> None:
    z = np.asarray(latents, np.float64).reshape(-1, np.shape(latents)[-1])
    if self.sum is None:
      self.sum, self.sumsq = np.zeros(z.shape[1]), np.zeros(z.shape[1])
    self.count += z.shape[0]
    self.sum += z.sum(axis=0)
    self.sumsq += np.square(z).sum(axis=0)

  def mean(self) -> np.ndarray:
    return self.sum / self.count

  def std(self) -> np.ndarray:
    return np.sqrt(np.maximum(self.sumsq / self.count - np.square(self.mean()), 0.0))


def gaussian_kl(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> np.ndarray:
  """KL(N(m1, s1^2) || N(m2, s2^2)) per entry."""
  m1, s1, m2, s2 = (np.asarray(v, np.float64) for v in (m1, s1, m2, s2))
  return np.log(s2 / s1) + (np.square(s1) + np.square(m1 - m2)) / (2.0 * np.square(s2)) - 0.5


class LatentCompat:
  """The statistics of the module docstring, clip by clip (`add` takes the rows of one batch)."""

  def __init__(self):
    self.cv, self.image_slice, self.image_all = ChannelStats(), ChannelStats(), ChannelStats()

  def add(self, cv_latents: np.ndarray, image_latents: np.ndarray, rows: Sequence[int]) -> None:
    """`cv_latents [B, 1+k, h, w, C]`, `image_latents [B, 1+4k, h, w, C]`; only `rows` of the batch count. Clip by
    clip, so that the sums do not depend on how clips were batched."""
    for row in rows:
      self.cv.add(cv_latents[row])
      self.image_slice.add(image_latents[row, ::TEMPORAL_COMPRESSION])
      self.image_all.add(image_latents[row])

  @property
  def empty(self) -> bool:
    return self.cv.count == 0

  def summary(self) -> dict[str, Any]:
    """Per-channel means, stds and KLs (against the slice frames, and against every frame), and their sums."""
    m, s = self.cv.mean(), self.cv.std()
    out = {"channels": int(m.shape[0]), "positions": {"cv": self.cv.count, "image_slice": self.image_slice.count,
                                                      "image_all": self.image_all.count},
           "cv": {"mean": m.tolist(), "std": s.tolist()}}
    for name, ref in (("image_slice", self.image_slice), ("image_all", self.image_all)):
      kl = gaussian_kl(m, s, ref.mean(), ref.std())
      out[name] = {"mean": ref.mean().tolist(), "std": ref.std().tolist(), "kl": kl.tolist(), "kl_sum": float(kl.sum())}
    return out
