"""Tests for cvvae_jax/losses.py against hand-computed values."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models.psi import PsiMapping
from cvvae_jax.train import losses


def mse_per_frame(x, y):
  """A stand-in perceptual distance: mean squared difference of each frame, [N]."""
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


# --- LossWeights ----------------------------------------------------------------------------------


def test_loss_weights_defaults_are_released_config():
  w = losses.LossWeights()
  assert (w.kl_weight, w.perceptual_weight, w.disc_weight, w.disc_start) == (1.0, 0.5, 0.5, 1)
  assert (w.reg_decoder_weight, w.reg_encoder_weight, w.logvar_init) == (1.0, 0.0, 0.0)
  assert w.psi is PsiMapping.RANDOM
  assert (w.adaptive_weight_eps, w.adaptive_weight_max) == (1e-4, 1e4)
  hash(w)  # usable as a static value


def test_loss_weights_from_config_dict():
  w = losses.LossWeights(**{"psi": "slice", "reg_encoder_weight": 1.0})
  assert w.psi is PsiMapping.SLICE and w.reg_encoder_weight == 1.0
  assert dataclasses.replace(w, kl_weight=2.0).psi is PsiMapping.SLICE
  with pytest.raises(TypeError):
    losses.LossWeights(kl_wieght=1.0)
  with pytest.raises(ValueError, match="psi mapping"):
    losses.LossWeights(psi="avg")
  with pytest.raises(ValueError, match="kl_weight to be a number >= 0, got -1"):
    losses.LossWeights(kl_weight=-1)


# --- reconstruction NLL ---------------------------------------------------------------------------

# B=1, T=2 frames of H=1, W=2, C=1.
X = jnp.array([0.5, -0.5, 0.0, 1.0]).reshape(1, 2, 1, 2, 1)
Y = jnp.zeros((1, 2, 1, 2, 1))
# l1 = [[.5, .5], [0, 1]]; mse per frame p = [.25, .5];
# rec = l1 + 0.5 p = [[.625, .625], [.25, 1.25]], sum 2.75, over N = 2 frames.


def test_reconstruction_nll_hand_computed():
  nll, m = losses.reconstruction_nll(X, Y, 0.0, mse_per_frame, 0.5)
  np.testing.assert_allclose(nll, 2.75 / 2, rtol=1e-6)
  np.testing.assert_allclose(m["rec/l1"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["rec/perceptual"], 0.375, rtol=1e-6)
  np.testing.assert_allclose(m["rec"], 2.75 / 4, rtol=1e-6)
  # logvar = ln 2: sum(rec / 2 + ln 2) / 2 = (1.375 + 4 ln 2) / 2
  nll2, m2 = losses.reconstruction_nll(X, Y, jnp.log(2.0), mse_per_frame, 0.5)
  np.testing.assert_allclose(nll2, (1.375 + 4 * math.log(2.0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(m2["logvar"], math.log(2.0), rtol=1e-6)
  # without the perceptual term: sum(l1) / 2 = 1
  nll0, _ = losses.reconstruction_nll(X, Y, 0.0, None, 0.0)
  np.testing.assert_allclose(nll0, 1.0, rtol=1e-6)


def test_reconstruction_nll_logvar_gradient():
  # d/dlv sum(rec e^-lv + lv) / N at lv = 0 is (count - sum(rec)) / N = (4 - 2.75) / 2
  g = jax.grad(lambda lv: losses.reconstruction_nll(X, Y, lv, mse_per_frame, 0.5)[0])(0.0)
  np.testing.assert_allclose(g, 0.625, rtol=1e-6)


def test_reconstruction_nll_reduction_is_mean_over_frames():
  rng = np.random.default_rng(0)
  b, t, h, w, c = 2, 5, 3, 4, 3
  x = rng.uniform(-1, 1, size=(b, t, h, w, c)).astype(np.float32)
  y = rng.uniform(-1, 1, size=(b, t, h, w, c)).astype(np.float32)
  lv = 0.4
  nll, _ = jax.jit(losses.reconstruction_nll, static_argnums=(3, 4))(x, y, lv, mse_per_frame, 0.5)
  p = np.mean((x - y) ** 2, axis=(2, 3, 4))  # [B, T]
  rec = np.abs(x - y) + 0.5 * p[:, :, None, None, None]
  expected = np.sum(rec / np.exp(lv) + lv) / (b * t)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)
  # images [B, H, W, C] are frames too
  nll_img, _ = losses.reconstruction_nll(x[:, 0], y[:, 0], lv, mse_per_frame, 0.5)
  np.testing.assert_allclose(nll_img, np.sum(rec[:, 0] / np.exp(lv) + lv) / b, rtol=1e-5)


def _frame_distance(x, y):
  """A stand-in perceptual distance: mean squared difference per frame `[N, H, W, C] -> [N]`."""
  return jnp.mean((x - y) ** 2, axis=(1, 2, 3))


def test_lpips_on_a_frame_subset_keeps_the_nll_in_expectation():
  """k of T frames per clip, T/k times their distance: over many draws the mean of each frame's estimate, and of the
  NLL, is the every-frame value; each draw uses k distinct frames per clip."""
  b, t, k = 2, 5, 2
  x = jax.random.uniform(jax.random.PRNGKey(0), (b, t, 3, 4, 3), minval=-1, maxval=1)
  y = jax.random.uniform(jax.random.PRNGKey(1), (b, t, 3, 4, 3), minval=-1, maxval=1)
  flat = lambda v: v.reshape(-1, 3, 4, 3)
  full = _frame_distance(flat(x), flat(y))
  draws = jax.vmap(lambda key: losses.frame_subset_perceptual(_frame_distance, key, t, k)(flat(x), flat(y)))(
      jax.random.split(jax.random.PRNGKey(2), 20000))
  chosen = np.asarray(draws > 0).reshape(-1, b, t)
  assert np.all(chosen.sum(-1) == k)                               # k distinct frames of each clip, every draw
  np.testing.assert_allclose(chosen.mean(0), k / t, atol=0.015)    # each frame as often as the others
  np.testing.assert_allclose(np.asarray(draws).mean(0), np.asarray(full), rtol=0.03)
  nll_full, _ = losses.reconstruction_nll(x, y, 0.3, _frame_distance, 0.5)
  nll_of = lambda key: losses.reconstruction_nll(
      x, y, 0.3, losses.frame_subset_perceptual(_frame_distance, key, t, k), 0.5)[0]
  nlls = jax.vmap(nll_of)(jax.random.split(jax.random.PRNGKey(3), 20000))
  np.testing.assert_allclose(float(nlls.mean()), float(nll_full), rtol=2e-3)
  # All frames chosen: the every-frame term itself; gradients reach only the chosen frames.
  all_frames = losses.frame_subset_perceptual(_frame_distance, jax.random.PRNGKey(4), t, t)
  np.testing.assert_allclose(all_frames(flat(x), flat(y)), full, rtol=1e-6)
  some = losses.frame_subset_perceptual(_frame_distance, jax.random.PRNGKey(5), t, k)
  grad = jax.grad(lambda v: jnp.sum(some(flat(x), v)))(flat(y))
  touched = np.asarray(jnp.any(grad != 0, axis=(1, 2, 3)))
  np.testing.assert_array_equal(touched, np.asarray(some(flat(x), flat(y)) > 0))
  with pytest.raises(ValueError, match="perceptual_frames <= frames per clip"):
    losses.frame_subset_perceptual(_frame_distance, jax.random.PRNGKey(0), t, t + 1)
  with pytest.raises(ValueError, match="perceptual_frames to be an int >= 0"):
    losses.LossWeights(perceptual_frames=-1)


def test_reconstruction_nll_errors():
  with pytest.raises(ValueError, match="perceptual callable for perceptual_weight=0.5"):
    losses.reconstruction_nll(X, Y, 0.0, None, 0.5)
  with pytest.raises(ValueError, match=r"one distance per frame, shape \(2,\), got \(\)"):
    losses.reconstruction_nll(X, Y, 0.0, lambda a, b: jnp.sum(a - b), 0.5)
  with pytest.raises(ValueError, match="inputs' shape"):
    losses.reconstruction_nll(X, Y[:, :1], 0.0, mse_per_frame, 0.5)
  # LPIPS-style [N, 1, 1, 1] output is accepted
  nll, _ = losses.reconstruction_nll(X, Y, 0.0, lambda a, b: mse_per_frame(a, b)[:, None, None, None], 0.5)
  np.testing.assert_allclose(nll, 1.375, rtol=1e-6)


# --- KL -------------------------------------------------------------------------------------------


def test_kl_hand_computed():
  mean = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  logvar = jnp.array([[0.0, math.log(2.0)], [0.0, 0.0]])
  # example 0: 0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)) ; example 1: 0 ; mean over B = 2
  expected = 0.5 * (1.0 + 1.0 - math.log(2.0)) / 2
  np.testing.assert_allclose(losses.kl_loss(mean, logvar), expected, rtol=1e-6)
  # sums over all latent dims of a video latent [B, 1+k, h, w, C]
  m5 = jnp.ones((2, 3, 2, 2, 4))
  np.testing.assert_allclose(losses.kl_loss(m5, jnp.zeros_like(m5)), 0.5 * 3 * 2 * 2 * 4, rtol=1e-6)
  with pytest.raises(ValueError, match="one shape"):
    losses.kl_loss(m5, m5[:1])


# --- GAN terms ------------------------------------------------------------------------------------


def test_hinge_and_generator_losses():
  real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - r) = [0, .5, 2], mean 5/6
  fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + f) = [0, 1, 2], mean 1
  np.testing.assert_allclose(losses.hinge_discriminator_loss(real, fake), 0.5 * (5 / 6 + 1), rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adversarial_loss(jnp.array([[1.0, 2.0], [3.0, 6.0]])), -3.0)


def test_discriminator_loss_is_off_before_start():
  real, fake = jnp.array([0.0]), jnp.array([0.0])
  off, m = losses.discriminator_loss(real, fake, jnp.int32(4), 5)
  on, _ = losses.discriminator_loss(real, fake, jnp.int32(5), 5)
  assert float(off) == 0.0 and float(m["disc/hinge"]) == 1.0 and float(on) == 1.0


def test_adaptive_weight_formula_and_clamp():
  w = losses.adaptive_generator_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]), 0.5)
  np.testing.assert_allclose(w, 5.0 / (2.0 + 1e-4) * 0.5, rtol=1e-6)
  # ||grad g|| = 0: 5 / 1e-4 = 5e4 is clamped to 1e4, times 0.5
  np.testing.assert_allclose(losses.adaptive_generator_weight(jnp.array([3.0, 4.0]), jnp.zeros(2), 0.5), 5000.0)
  # pytrees: global norm
  w_tree = losses.adaptive_generator_weight({"a": jnp.array([3.0])}, {"b": jnp.array([[1.0, 1.0]]), "c": jnp.ones(2)},
                                            1.0)
  np.testing.assert_allclose(w_tree, 3.0 / (2.0 + 1e-4), rtol=1e-6)
  # no gradient through the weight
  g = jax.grad(lambda a: losses.adaptive_generator_weight(a, jnp.array([1.0, 1.0])))(jnp.array([3.0, 4.0]))
  np.testing.assert_array_equal(g, 0.0)


def test_adaptive_weight_from_last_layer_grads():
  """As the train step uses it: gradients of the two losses w.r.t. the decoder's last kernel."""
  kernel = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  a = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # grad of nll: ||a|| = 5
  b = jnp.array([[0.0, 3.0], [4.0, 0.0]])  # grad of g: ||b|| = 5
  nll_grad = jax.grad(lambda k: jnp.sum(a * k))(kernel)
  g_grad = jax.grad(lambda k: jnp.sum(b * k) + 7.0)(kernel)
  np.testing.assert_allclose(losses.adaptive_generator_weight(nll_grad, g_grad, 0.5), 0.5 * 5 / (5 + 1e-4), rtol=1e-6)


def test_disc_factor_no_recompile():
  traces = []

  @jax.jit
  def weighted(step, x):
    traces.append(1)
    return losses.disc_factor(step, 10) * x

  before = weighted(jnp.int32(9), 2.0)
  at = weighted(jnp.int32(10), 2.0)
  after = weighted(jnp.int32(11), 2.0)
  assert (float(before), float(at), float(after)) == (0.0, 2.0, 2.0)
  assert len(traces) == 1


# --- generator_loss -------------------------------------------------------------------------------


def test_generator_loss_hand_computed():
  pieces = dict(nll=2.0, kl=3.0, g_loss=-1.0, d_weight=0.25, reg_decoder=0.5)
  w = losses.LossWeights()
  total, m = losses.generator_loss(w, step=jnp.int32(5), **pieces)
  # 2 + 0.25 * 1 * (-1) + 1.0 * 3 + 1.0 * 0.5
  np.testing.assert_allclose(total, 5.25, rtol=1e-6)
  assert float(m["scalars/disc_factor"]) == 1.0
  np.testing.assert_allclose(m["weighted/g"], -0.25)
  np.testing.assert_allclose(sum(v for k, v in m.items() if k.startswith("weighted/")), total, rtol=1e-6)
  for key in ("loss/total", "loss/nll", "loss/kl", "loss/g", "loss/reg_decoder", "loss/reg_encoder",
        "scalars/d_weight", "weighted/kl", "weighted/reg_decoder", "weighted/reg_encoder"):
    assert key in m
  # before disc_start (1) the GAN term is off
  total0, m0 = losses.generator_loss(w, step=jnp.int32(0), **pieces)
  np.testing.assert_allclose(total0, 5.5, rtol=1e-6)
  assert float(m0["scalars/disc_factor"]) == 0.0
  # other weights, with the encoder-side term: 2 - 0.25 + 0.1 * 3 + 0.5 + 2 * 7
  w2 = losses.LossWeights(kl_weight=0.1, reg_encoder_weight=2.0)
  total2, m2 = jax.jit(losses.generator_loss, static_argnums=0)(w2, step=jnp.int32(5), reg_encoder=7.0, **pieces)
  np.testing.assert_allclose(total2, 16.55, rtol=1e-6)
  np.testing.assert_allclose(m2["weighted/reg_encoder"], 14.0)


def test_generator_loss_missing_terms():
  w = losses.LossWeights()
  with pytest.raises(ValueError, match="reg_decoder loss for reg_decoder_weight=1.0"):
    losses.generator_loss(w, nll=1.0, kl=0.0, g_loss=0.0, d_weight=0.0, step=0)
  total, m = losses.generator_loss(
    dataclasses.replace(w, reg_decoder_weight=0.0), nll=1.0, kl=2.0, g_loss=0.0, d_weight=0.0, step=0
  )
  np.testing.assert_allclose(total, 3.0)
  assert float(m["loss/reg_encoder"]) == 0.0
