"""Tests for cvvae_jax/regularizer.py: psi mappings and the image-VAE latent regularizers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.regularizer import (
  PsiMapping,
  decoder_regularization,
  encoder_regularization_latent,
  psi,
  psi_num_frames,
)


def index_video(b=3, k=2, h=2, w=2, c=3):
  """Video whose pixels hold 100 * example + frame index: [B, 1+4k, H, W, C]."""
  t = 1 + 4 * k
  values = 100.0 * np.arange(b)[:, None] + np.arange(t)[None, :]
  return jnp.asarray(np.broadcast_to(values[:, :, None, None, None], (b, t, h, w, c)).astype(np.float32))


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


# --- decoder-side regularization ------------------------------------------------------------------

PROJ = np.array([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]], np.float32)  # latent channels 2 -> RGB


def fake_image_decode(z):
  """[N, h, w, 2] -> [N, 2h, 2w, 3]: 1x1 projection then nearest 2x upsampling."""
  x = jnp.einsum("nhwc,cd->nhwd", z, PROJ)
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def np_image_decode(z):
  x = np.einsum("nhwc,cd->nhwd", z, PROJ)
  return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def test_decoder_regularization_hand_computed():
  # one frame, one pixel, identity decoder: |[0.5, -0.5, 0] - [0, 0, 1]| = [0.5, 0.5, 1]
  latent = jnp.array([0.0, 0.0, 1.0]).reshape(1, 1, 1, 1, 3)
  video = jnp.array([0.5, -0.5, 0.0]).reshape(1, 1, 1, 1, 3)
  loss, aux = decoder_regularization(latent, video, lambda z: z, PsiMapping.SLICE, None, jnp.log(2.0))
  # sum(l1) / exp(lv) + 3 * lv = 2 / 2 + 3 ln 2, over N = 1 frame
  np.testing.assert_allclose(loss, 1.0 + 3 * math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["reg_decoder/l1"], 2.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["reg_decoder/logvar_2d"], math.log(2.0), rtol=1e-6)


def test_decoder_regularization_matches_numpy_slice():
  rng = np.random.default_rng(0)
  b, k, h, w = 2, 2, 2, 3
  latent = rng.normal(size=(b, 1 + k, h, w, 2)).astype(np.float32)
  video = rng.uniform(-1, 1, size=(b, 1 + 4 * k, 2 * h, 2 * w, 3)).astype(np.float32)
  logvar_2d = 0.3
  loss, aux = jax.jit(decoder_regularization, static_argnums=(2, 3))(
    jnp.asarray(latent), jnp.asarray(video), fake_image_decode, PsiMapping.SLICE, None, logvar_2d
  )
  targets = video[:, ::4]
  decoded = np_image_decode(latent.reshape(-1, h, w, 2)).reshape(targets.shape)
  expected = np.sum(np.abs(targets - decoded) / np.exp(logvar_2d) + logvar_2d) / (b * (1 + k))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux.decoded, decoded, rtol=1e-6)
  np.testing.assert_allclose(aux.targets, targets)
  np.testing.assert_allclose(aux.metrics["reg_decoder/nll"], expected, rtol=1e-5)


def test_decoder_regularization_first_decodes_only_frame_zero():
  rng = np.random.default_rng(1)
  b, k, h, w = 2, 2, 1, 2
  latent = rng.normal(size=(b, 1 + k, h, w, 2)).astype(np.float32)
  video = rng.uniform(-1, 1, size=(b, 1 + 4 * k, 2 * h, 2 * w, 3)).astype(np.float32)
  seen = []

  def decode(z):
    seen.append(z.shape)
    return fake_image_decode(z)

  loss, aux = decoder_regularization(jnp.asarray(latent), jnp.asarray(video), decode, PsiMapping.FIRST, None, 0.0)
  assert seen == [(b, h, w, 2)]
  assert aux.decoded.shape == (b, 1, 2 * h, 2 * w, 3)
  decoded = np_image_decode(latent[:, 0])
  expected = np.sum(np.abs(video[:, 0] - decoded)) / b
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_decoder_regularization_random_and_gradient():
  rng = np.random.default_rng(2)
  b, k, h, w = 2, 1, 1, 1
  latent = jnp.asarray(rng.normal(size=(b, 1 + k, h, w, 2)).astype(np.float32))
  video = index_video(b=b, k=k, h=2 * h, w=2 * w, c=3) / 100.0
  key = jax.random.PRNGKey(3)

  def loss_fn(z, lv):
    return decoder_regularization(z, video, fake_image_decode, PsiMapping.RANDOM, key, lv)[0]

  targets = np.asarray(psi(video, PsiMapping.RANDOM, key))
  decoded = np_image_decode(np.asarray(latent).reshape(-1, h, w, 2)).reshape(targets.shape)
  l1 = np.abs(targets - decoded)
  np.testing.assert_allclose(loss_fn(latent, 0.0), l1.sum() / (b * (1 + k)), rtol=1e-5)
  # the gradient flows through the (frozen) image decoder into the latent
  g_latent = jax.grad(loss_fn)(latent, 0.0)
  assert float(jnp.abs(g_latent).sum()) > 0
  # d/d logvar of sum(l1 e^-lv + lv) / N at lv = 0 is (count - sum(l1)) / N
  g_lv = jax.grad(loss_fn, argnums=1)(latent, 0.0)
  np.testing.assert_allclose(g_lv, (l1.size - l1.sum()) / (b * (1 + k)), rtol=1e-5)


def test_decoder_regularization_shape_errors():
  video = jnp.zeros((2, 9, 4, 4, 3))
  with pytest.raises(ValueError, match=r"expected latent of shape \[B=2, 1\+k=3"):
    decoder_regularization(jnp.zeros((2, 2, 2, 2, 2)), video, fake_image_decode, PsiMapping.SLICE, None, 0.0)
  with pytest.raises(ValueError, match=r"image_decode to return images of shape \(6, 4, 4, 3\)"):
    decoder_regularization(jnp.zeros((2, 3, 2, 2, 2)), video, lambda z: z, PsiMapping.SLICE, None, 0.0)


# --- encoder-side regularization ------------------------------------------------------------------


def fake_image_encode(x):
  """[N, H, W, 3] -> [N, H/2, W/2, 2]: 2x2 average pooling then a fixed channel map."""
  n, h, w, c = x.shape
  pooled = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return jnp.einsum("nhwc,cd->nhwd", pooled, PROJ.T)


def test_encoder_regularization_latent_mean():
  rng = np.random.default_rng(4)
  b, k = 2, 2
  video = rng.uniform(-1, 1, size=(b, 1 + 4 * k, 4, 4, 3)).astype(np.float32)
  latent = encoder_regularization_latent(jnp.asarray(video), fake_image_encode, PsiMapping.MEAN, None)
  assert latent.shape == (b, 1 + k, 2, 2, 2)
  targets = np.concatenate([video[:, :1], video[:, 1:].reshape(b, k, 4, 4, 4, 3).mean(axis=2)], axis=1)
  pooled = targets.reshape(b, 1 + k, 2, 2, 2, 2, 3).mean(axis=(3, 5))
  np.testing.assert_allclose(latent, np.einsum("bthwc,cd->bthwd", pooled, PROJ.T), rtol=1e-5, atol=1e-6)


def test_encoder_regularization_latent_is_frozen_and_rejects_first():
  video = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, size=(1, 5, 4, 4, 3)).astype(np.float32))
  grad = jax.grad(lambda v: encoder_regularization_latent(v, fake_image_encode, PsiMapping.SLICE, None).sum())(video)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match="got PsiMapping.FIRST"):
    encoder_regularization_latent(video, fake_image_encode, PsiMapping.FIRST, None)
  with pytest.raises(ValueError, match=r"image_encode to return latents of shape \[2, h, w, C\]"):
    encoder_regularization_latent(video, lambda x: x[:1], PsiMapping.SLICE, None)
