"""Tests for cvvae_jax/models/psi.py: the psi mappings (which frames a latent frame stands for)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models.psi import PsiMapping, psi, psi_num_frames
from tests.helpers import index_video


def frame_ids(out):
  """[B, L, H, W, C] of constant frames -> [B, L] values (asserting each frame is constant)."""
  out = np.asarray(out)
  first = out[:, :, :1, :1, :1]
  np.testing.assert_array_equal(out, np.broadcast_to(first, out.shape))
  return first[:, :, 0, 0, 0]


# --- PsiMapping -----------------------------------------------------------------------------------


def test_parse():
  assert PsiMapping.parse("random") is PsiMapping.RANDOM
  assert PsiMapping.parse(" Slice ") is PsiMapping.SLICE
  assert PsiMapping.parse("MEAN") is PsiMapping.MEAN
  assert PsiMapping.parse(PsiMapping.FIRST) is PsiMapping.FIRST
  with pytest.raises(ValueError, match=r"one of \['random', 'slice', 'mean', 'first'\], got 'avg'"):
    PsiMapping.parse("avg")
  with pytest.raises(ValueError):
    PsiMapping.parse(3)


def test_functions_require_parsed_enum():
  with pytest.raises(TypeError, match="PsiMapping.parse"):
    psi(index_video(), "slice")


# --- psi ------------------------------------------------------------------------------------------


def test_psi_slice_takes_last_frame_of_each_group():
  out = psi(index_video(k=3), PsiMapping.SLICE)
  assert out.shape == (3, 4, 2, 2, 3)
  np.testing.assert_array_equal(frame_ids(out), [[0, 4, 8, 12], [100, 104, 108, 112], [200, 204, 208, 212]])


def test_psi_mean_averages_each_group():
  out = psi(index_video(k=2), PsiMapping.MEAN)
  # group {1,2,3,4} -> 2.5, group {5,6,7,8} -> 6.5
  np.testing.assert_allclose(frame_ids(out), [[0, 2.5, 6.5], [100, 102.5, 106.5], [200, 202.5, 206.5]])


def test_psi_first_keeps_frame_zero_only():
  out = psi(index_video(k=2), PsiMapping.FIRST)
  assert out.shape == (3, 1, 2, 2, 3)
  np.testing.assert_array_equal(frame_ids(out), [[0], [100], [200]])
  assert psi_num_frames(9, PsiMapping.FIRST) == 1
  assert psi_num_frames(9, PsiMapping.RANDOM) == 3


def test_psi_random_picks_one_frame_per_group_per_example():
  b, k = 2000, 3
  video = index_video(b=b, k=k, h=1, w=1, c=1)
  out = jax.jit(psi, static_argnums=1)(video, PsiMapping.RANDOM, jax.random.PRNGKey(0))
  ids = frame_ids(out) - 100.0 * np.arange(b)[:, None]  # frame index within its own example
  np.testing.assert_array_equal(ids[:, 0], 0)
  for i in range(k):
    group = ids[:, 1 + i]
    assert set(np.unique(group)) == {4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4}
    counts = np.bincount((group - 4 * i - 1).astype(int), minlength=4) / b
    np.testing.assert_allclose(counts, 0.25, atol=0.05)  # uniform
  # independent per example: the examples do not all share one choice
  assert len({tuple(row) for row in ids[:50]}) > 1
  # deterministic given the key, different for another key
  again = psi(video, PsiMapping.RANDOM, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, again)
  other = psi(video, PsiMapping.RANDOM, jax.random.PRNGKey(1))
  assert not np.array_equal(out, other)


def test_psi_random_needs_key():
  with pytest.raises(ValueError, match="PRNG key"):
    psi(index_video(), PsiMapping.RANDOM)


def test_psi_images_and_bad_lengths():
  image_clip = index_video(k=0)  # T = 1
  for mapping in PsiMapping:
    out = psi(image_clip, mapping, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, image_clip)
  with pytest.raises(ValueError, match=r"T = 1 \+ 4k frames, got T=8"):
    psi(jnp.zeros((1, 8, 2, 2, 3)), PsiMapping.SLICE)
  with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
    psi(jnp.zeros((8, 2, 2, 3)), PsiMapping.SLICE)
