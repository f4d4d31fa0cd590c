"""Tests for cvvae_jax/train/regularizer.py: the image-VAE latent regularizers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models.psi import PsiMapping, psi
from cvvae_jax.train.regularizer import decoder_regularization, encoder_regularization_latent
from tests.helpers import index_video


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
