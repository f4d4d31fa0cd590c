"""Tests of cvvae_jax/eval/fvd.py (the Fréchet distance against float64 NumPy/SciPy references) and of rFVD on real
clips (I3D features of the embedded videos: monotone in noise, larger for a poor reconstruction)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

import cvvae_jax
from cvvae_jax.data import embedded, media
from cvvae_jax.eval import fvd
from cvvae_jax.models import i3d
from tests.helpers import random_params


def _reference_frechet(mu1, s1, mu2, s2):
  """tr(sqrt(S1 S2)) as tr(sqrt(S1^1/2 S2 S1^1/2)) from symmetric eigendecompositions, float64 (independent of
  fvd.py's singular-value form)."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ s2 @ root)
  inner[inner < 1e-12 * inner.max()] = 0.0  # rounding noise of a rank-deficient product is 0, not its sqrt
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_of_known_gaussians():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  d1, d2 = rng.uniform(0.5, 2.0, 16), rng.uniform(0.5, 2.0, 16)
  closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))  # diagonal covariances
  assert fvd.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed_form, rel=1e-12)
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))  # the same Gaussians rotated: the distance is invariant
  got = fvd.frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
  assert got == pytest.approx(closed_form, rel=1e-9)


def test_frechet_distance_of_random_features_matches_the_reference():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(600, 40))
  b = 0.8 * rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40)) / 6 + 0.3
  want = _reference_frechet(*fvd.gaussian(a), *fvd.gaussian(b))
  assert fvd.fvd(a, b) == pytest.approx(want, rel=1e-9)
  assert fvd.fvd(a, a) == pytest.approx(0.0, abs=1e-9)
  # Full-rank covariances: SciPy's sqrtm of the product (pytorch-fid's way) agrees.
  mu1, s1 = fvd.gaussian(a)
  mu2, s2 = fvd.gaussian(b)
  scipy_trace = np.trace(linalg.sqrtm(s1 @ s2).real)
  want_scipy = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * scipy_trace)
  assert fvd.fvd(a, b) == pytest.approx(want_scipy, rel=1e-9)
  # Rank-deficient covariances (fewer clips than dimensions): the features are the factors; the same value as the
  # Gaussians' symmetric roots and the eigh reference, and exactly finite.
  few = rng.normal(size=(8, 40))
  near = few + 0.1 * rng.normal(size=few.shape)
  assert fvd.fvd(few, near) == pytest.approx(_reference_frechet(*fvd.gaussian(few), *fvd.gaussian(near)), rel=1e-9)
  assert fvd.fvd(few, near) == pytest.approx(fvd.frechet_distance(*fvd.gaussian(few), *fvd.gaussian(near)), rel=1e-9)
  assert fvd.fvd(few, few) == pytest.approx(0.0, abs=1e-9)
  lo, hi = fvd.bootstrap_interval(a[:60], b[:60], resamples=30)
  assert lo < fvd.fvd(a[:60], b[:60]) < hi and (lo, hi) == fvd.bootstrap_interval(a[:60], b[:60], resamples=30)
  lo_all, hi_all = fvd.bootstrap_interval(a[:500], b, resamples=30)
  assert hi_all - lo_all < hi - lo  # ten times the clips: a narrower interval
  with pytest.raises(ValueError, match="N >= 2"):
    fvd.gaussian(a[:1])


@pytest.fixture(scope="module")
def real_clips(embedded_src):
  """Six real 9-frame clips [6, 9, 64, 64, 3] in [-1, 1] from the embedded videos."""
  folder = embedded.split_folder(embedded_src, "video")
  paths = sorted(os.listdir(folder))[:6]
  return np.stack([media.read_video(os.path.join(folder, p), num_frames=9, stride=2, size=(64, 64)) for p in paths])


@pytest.mark.slow  # I3D on 30 real clips: a minute on 2 cores
def test_rfvd_on_real_clips_grows_with_noise_and_with_a_poor_reconstruction(real_clips):
  params = i3d.load_i3d_params()
  features = jax.jit(lambda x: i3d.i3d_logits(params, i3d.preprocess(x)))
  clean = np.asarray(features(jnp.asarray(real_clips)))
  rng = np.random.default_rng(0)
  noisy = {s: np.asarray(features(jnp.asarray(real_clips + s * rng.normal(size=real_clips.shape).astype(np.float32))))
           for s in (0.05, 0.15, 0.4)}
  values = [fvd.fvd(clean, noisy[s]) for s in sorted(noisy)]
  assert fvd.fvd(clean, clean) == pytest.approx(0.0, abs=1e-6)
  assert all(np.isfinite(values)) and 0 < values[0] < values[1] < values[2], values
  # A demo-size CV-VAE (configs/cvvae.py:demo's architecture) with random weights reconstructs poorly.
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 64, 64), layers_per_block=1)
  recon = jax.jit(lambda p, x: vae.apply({"params": p}, x)[0])(random_params(vae), jnp.asarray(real_clips))
  poor = fvd.fvd(clean, np.asarray(features(recon)))
  assert np.isfinite(poor) and poor > values[0], (poor, values)
