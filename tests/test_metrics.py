"""Tests of cvvae_jax.metrics against scikit-image (PSNR, SSIM) and numpy (summaries)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cvvae_jax import metrics as M
from tests.helpers import astronaut_videos as _videos


def _unit(v):
  return (v.astype(np.float64) + 1.0) / 2.0


def test_psnr_ssim_match_skimage_per_frame():
  x, y = _videos()
  p = np.asarray(jax.jit(M.psnr)(jnp.asarray(x), jnp.asarray(y)))
  s = np.asarray(jax.jit(M.ssim)(jnp.asarray(x), jnp.asarray(y)))
  assert p.shape == s.shape == (2, 5)
  for i in range(2):
    for j in range(5):
      a, b = _unit(x[i, j]), _unit(y[i, j])
      ref_p = peak_signal_noise_ratio(a, b, data_range=1.0)
      ref_s = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    channel_axis=-1, data_range=1.0)
      assert abs(p[i, j] - ref_p) < 1e-4, (i, j, p[i, j], ref_p)
      assert abs(s[i, j] - ref_s) < 1e-4, (i, j, s[i, j], ref_s)
  # The noise levels differ per frame, so the values must too (no constant answer passes).
  assert np.ptp(p) > 3.0 and np.ptp(s) > 0.1


def test_ssim_matches_skimage_on_structured_and_random_images():
  rng = np.random.default_rng(3)
  a = rng.uniform(-1, 1, size=(3, 23, 31, 3)).astype(np.float32)
  # Structured distortions: contrast change, brightness shift, a blend with another image.
  b = np.stack([0.5 * a[0], np.clip(a[1] + 0.3, -1, 1), 0.7 * a[2] + 0.3 * a[0]]).astype(np.float32)
  s = np.asarray(M.ssim(jnp.asarray(a), jnp.asarray(b)))
  for k in range(3):
    ref = structural_similarity(_unit(a[k]), _unit(b[k]), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, channel_axis=-1, data_range=1.0)
    assert abs(s[k] - ref) < 1e-4, (k, s[k], ref)


def test_gaussian_window_is_scipy_gaussian():
  from scipy.ndimage import gaussian_filter1d
  impulse = np.zeros(21)
  impulse[10] = 1.0
  ref = gaussian_filter1d(impulse, sigma=1.5, truncate=3.5)[5:16]
  np.testing.assert_allclose(M.gaussian_window(), ref, rtol=1e-6, atol=1e-8)


def test_identity_and_clipping():
  x, y = _videos(b=1, t=2)
  xj = jnp.asarray(x)
  assert np.all(np.isinf(np.asarray(M.psnr(xj, xj))))
  np.testing.assert_allclose(np.asarray(M.ssim(xj, xj)), 1.0, atol=1e-6)
  # Values outside [-1, 1] are clipped by default, kept with clip=False.
  y_out = jnp.asarray(y) * 1.5
  np.testing.assert_allclose(np.asarray(M.ssim(xj, y_out)),
                             np.asarray(M.ssim(xj, jnp.clip(y_out, -1, 1))), atol=1e-7)
  assert not np.allclose(np.asarray(M.psnr(xj, y_out, clip=False)), np.asarray(M.psnr(xj, y_out)))


def test_psnr_known_value_and_image_shapes():
  # [0, 1] images differing by exactly 0.1 everywhere: MSE 0.01 -> 20 dB.
  x = jnp.zeros((4, 16, 16, 3))
  y = x + 0.2  # 0.2 in [-1, 1] is 0.1 in [0, 1]
  np.testing.assert_allclose(np.asarray(M.psnr(x, y)), 20.0, rtol=1e-5)
  assert M.ssim(x, y).shape == (4,)


def test_input_errors():
  x = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="equal shape"):
    M.psnr(x, jnp.zeros((1, 16, 17, 3)))
  with pytest.raises(ValueError, match="H, W >= 11"):
    M.ssim(x[:, :10], x[:, :10])


def test_summaries():
  rng = np.random.default_rng(0)
  values = rng.normal(28.0, 2.0, size=50)
  s = M.summarize(values)
  assert s.n == 50
  assert math.isclose(s.mean, float(np.mean(values)), rel_tol=1e-12)
  assert math.isclose(s.ci95, 1.96 * float(np.std(values, ddof=1)) / math.sqrt(50), rel_tol=1e-12)
  assert "±" in str(s)
  # Per-clip means first: equal-length [N, T] and ragged lists agree.
  per_frame = rng.normal(0.8, 0.05, size=(6, 9))
  a = M.summarize_clips(per_frame)
  b = M.summarize_clips([row for row in per_frame])
  assert math.isclose(a.mean, b.mean) and math.isclose(a.ci95, b.ci95)
  ragged = [np.array([1.0, 3.0]), np.array([4.0]), np.array([0.0, 0.0, 3.0])]
  np.testing.assert_allclose(M.clip_means(ragged), [2.0, 4.0, 1.0])
  r = M.summarize_clips(ragged)
  assert math.isclose(r.mean, 7.0 / 3.0) and math.isclose(r.ci95, 1.96 * 1.5275252316519468 / math.sqrt(3))
  assert math.isnan(M.summarize([1.0]).ci95)
  with pytest.raises(ValueError, match="non-empty"):
    M.summarize([])
