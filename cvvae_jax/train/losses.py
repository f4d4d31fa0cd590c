"""CV-VAE training losses as pure functions of arrays (and of a perceptual-distance callable).

The objective (notes, "Training objective"):

  L_G = nll + d_weight * disc_factor(step) * g + kl_weight * kl
          + reg_decoder_weight * reg_decoder + reg_encoder_weight * reg_encoder
  L_D = disc_factor(step) * hinge(D(x), D(x_hat))

Reductions follow the original (`lvdm/modules/autoencoding/losses/discriminator_loss.py`), because the
released weights are set relative to them:

* `nll`: per element (|x - x_hat| + perceptual_weight * LPIPS(frame)) / exp(logvar) + logvar, with the
  frame's LPIPS broadcast over its pixels and channels, **summed over H, W, C and averaged over the B*T
  frames** (the original sums and divides by the size of its flattened `(b t)` batch).
* `kl`: summed over all latent elements, averaged over the batch B.
* GAN terms: means over all logits.

The decoder-side regularization lives in `regularizer.py`. Everything is computed in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from cvvae_jax.models.psi import PsiMapping

Perceptual = Callable[[jax.Array, jax.Array], jax.Array]
"""perceptual(x, y) -> [N]: a distance (LPIPS) between images `[N, H, W, 3]` in [-1, 1]."""


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Loss weights and constants; defaults are the released config (`cvvae_sd3_constraint_training.yaml`).

  Built as `LossWeights(**config.loss)` (unknown keys raise). Frozen and hashable, so it can be bound
  with `functools.partial` into a jitted step as a static value.

  Attributes:
      kl_weight: weight of the KL term (`regularization_weights.kl_loss: 1.0`).
      perceptual_weight: weight of LPIPS inside the reconstruction NLL (0.5).
      disc_weight: factor on the adaptive generator weight (0.5).
      disc_start: first step with the GAN terms on (`disc_start: 1`).
      reg_decoder_weight: l1, decoder-side latent regularization (`rec2d_weight: 1.0`).
      reg_encoder_weight: l2, encoder-side latent regularization (0.0, an ablation).
      logvar_init: initial value of the learned `logvar` and `logvar_2d` (0.0).
      psi: the psi mapping, a string parsed once into `PsiMapping` ("random").
      adaptive_weight_eps: added to ||grad g|| in the adaptive weight (1e-4).
      adaptive_weight_max: upper clamp of the adaptive weight before `disc_weight` (1e4).
      perceptual_frames: LPIPS on this many random frames of each clip per step (`frame_subset_perceptual`, an
    unbiased estimate of the every-frame term at k/T of its cost); 0 (the original): every frame.
  """

  kl_weight: float = 1.0
  perceptual_weight: float = 0.5
  disc_weight: float = 0.5
  disc_start: int = 1
  reg_decoder_weight: float = 1.0
  reg_encoder_weight: float = 0.0
  logvar_init: float = 0.0
  psi: PsiMapping = PsiMapping.RANDOM
  adaptive_weight_eps: float = 1e-4
  adaptive_weight_max: float = 1e4
  perceptual_frames: int = 0

  def __post_init__(self):
    object.__setattr__(self, "psi", PsiMapping.parse(self.psi))
    for name in ("kl_weight", "perceptual_weight", "disc_weight", "reg_decoder_weight",
                     "reg_encoder_weight", "adaptive_weight_eps", "adaptive_weight_max"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected {name} to be a number >= 0, got {value!r}")
    if not isinstance(self.disc_start, int):
      raise ValueError(f"expected disc_start to be an int, got {self.disc_start!r}")
    if not isinstance(self.perceptual_frames, int) or self.perceptual_frames < 0:
      raise ValueError(f"expected perceptual_frames to be an int >= 0 (0: every frame), got "
                       f"{self.perceptual_frames!r}")


def frame_subset_perceptual(perceptual: Perceptual, rng: jax.Array, frames_per_clip: int,
                            num_frames: int) -> Perceptual:
  """`perceptual` on `num_frames` random frames of each clip (distinct, uniform), as an unbiased estimate.

  The returned callable takes the frames of B clips, `[B * T, H, W, 3]` clip by clip (T = `frames_per_clip`, as
  `reconstruction_nll` flattens `[B, T, H, W, 3]`), and gives `[B * T]`: T/k times the distance on the k chosen
  frames and 0 elsewhere. Each frame is chosen with probability k/T, so the expectation over `rng` of every entry,
  and of the NLL (linear in it), is the every-frame value; LPIPS costs k/T of the full term.
  """
  t, k = int(frames_per_clip), int(num_frames)
  if not 0 < k <= t:
    raise ValueError(f"expected 0 < perceptual_frames <= frames per clip ({t}), got {k}")

  def subset(x: jax.Array, y: jax.Array) -> jax.Array:
    n = x.shape[0]
    if n % t:
      raise ValueError(f"expected [B * {t}, H, W, 3] frames (whole clips), got {n} frames")
    chosen = jnp.argsort(jax.random.uniform(rng, (n // t, t)), axis=1)[:, :k]  # k distinct frames per clip
    flat = (chosen + t * jnp.arange(n // t)[:, None]).reshape(-1)
    distance = jnp.asarray(perceptual(x[flat], y[flat]), jnp.float32).reshape(-1)
    return jnp.zeros((n,), jnp.float32).at[flat].set(distance * (t / k))

  return subset


def reconstruction_nll(
  inputs: jax.Array,
  reconstructions: jax.Array,
  logvar: jax.Array,
  perceptual: Optional[Perceptual] = None,
  perceptual_weight: float = 0.5,
) -> tuple[jax.Array, dict]:
  """Reconstruction NLL of latent-diffusion autoencoders: (L1 + w * LPIPS) / exp(logvar) + logvar.

    rec[n, h, w, c] = |x - x_hat|[n, h, w, c] + perceptual_weight * perceptual(x_n, x_hat_n)
    nll = sum_{n, h, w, c} (rec / exp(logvar) + logvar) / N

  N = number of frames (B*T for video, B for images): summed over pixels and channels, mean over
  frames, as the original. The per-frame LPIPS is broadcast over the frame's H*W*C elements, so its
  effective weight is H*W*C times the L1 of one element, exactly as in the original.

  Args:
      inputs: `[B, T, H, W, C]` video or `[B, H, W, C]` images, in [-1, 1].
      reconstructions: same shape as `inputs`.
      logvar: learned scalar log-variance (init 0.0).
      perceptual: `perceptual(x, y) -> [N]` on frames `[N, H, W, 3]` (LPIPS; `[N, 1, 1, 1]` is accepted
    too). Called on the float32 frames, gradients flow through it to `reconstructions`. None only when
    `perceptual_weight` is 0.
      perceptual_weight: 0.5 in the released config. A static Python number.

  Returns:
      `(nll, metrics)`; metrics: `rec/l1` (mean |x - x_hat|), `rec/perceptual` (mean LPIPS per frame),
      `rec` (mean of rec per element, the original's `loss/rec`), `nll`, `logvar`.
  """
  if inputs.shape != reconstructions.shape:
    raise ValueError(
      f"expected reconstructions of the inputs' shape {tuple(inputs.shape)}, "
      f"got {tuple(reconstructions.shape)}"
    )
  if inputs.ndim not in (4, 5):
    raise ValueError(
      f"expected video [B, T, H, W, C] or images [B, H, W, C], got shape {tuple(inputs.shape)}"
    )
  h, w, c = inputs.shape[-3:]
  x = inputs.reshape(-1, h, w, c).astype(jnp.float32)
  y = reconstructions.reshape(-1, h, w, c).astype(jnp.float32)
  num_frames = x.shape[0]
  logvar = jnp.asarray(logvar, jnp.float32)

  l1 = jnp.abs(x - y)  # [N, H, W, C]
  if perceptual is None:
    if perceptual_weight != 0:
      raise ValueError(
        f"expected a perceptual callable for perceptual_weight={perceptual_weight}, got None"
      )
    p = jnp.zeros((num_frames,), jnp.float32)
  else:
    raw = jnp.asarray(perceptual(x, y), jnp.float32)
    if raw.size != num_frames or (raw.ndim > 0 and raw.shape[0] != num_frames):
      raise ValueError(
        f"expected perceptual(x, y) to return one distance per frame, shape ({num_frames},), "
        f"got {tuple(raw.shape)}"
      )
    p = raw.reshape(num_frames)
  rec = l1 + perceptual_weight * p[:, None, None, None]  # broadcast over H, W, C as the original
  nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / num_frames
  metrics = {
    "rec/l1": jnp.mean(l1),
    "rec/perceptual": jnp.mean(p),
    "rec": jnp.mean(rec),
    "nll": nll,
    "logvar": logvar,
  }
  return nll, metrics


def kl_loss(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over the batch.

    kl = sum_{b, ...} 0.5 * (mean^2 + exp(logvar) - 1 - logvar) / B

  Args:
      mean, logvar: `[B, ...]` posterior parameters (e.g. `[B, 1+k, h, w, C]`); the logvar clamp to
    [-30, 20] belongs to the posterior (`distributions.py`), not here.
  Returns: scalar float32.
  """
  if mean.shape != logvar.shape:
    raise ValueError(
      f"expected mean and logvar of one shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}"
    )
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl) / mean.shape[0]


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake))); logits of any shape."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def with_gradient(value: jax.Array, grad: jax.Array, x: jax.Array) -> jax.Array:
  """`value` (a scalar f(x) computed elsewhere), differentiable as f: its gradient w.r.t. whatever `x` depends on is
  `grad` (df/dx at this `x`, also computed elsewhere) sent back through `x` by the chain rule.

      value + sum(stop_gradient(grad) * (x - stop_gradient(x)))      # = value exactly (x - x == 0)

  A loss network's value and gradient w.r.t. the reconstruction can then be evaluated once, in the forward pass, and
  the gradient reused (the adaptive GAN weight needs the same gradients), instead of the backward pass
  differentiating the network a second time. The product is taken in float32; `x`'s cotangent comes out in its dtype.
  """
  delta = (x - jax.lax.stop_gradient(x)).astype(jnp.float32)
  return jnp.asarray(value, jnp.float32) + jnp.sum(jax.lax.stop_gradient(grad).astype(jnp.float32) * delta)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(logits_fake): the generator's GAN loss on the discriminator's logits for x_hat."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_generator_weight(
  nll_grad,
  g_grad,
  disc_weight: float = 0.5,
  *,
  eps: float = 1e-4,
  max_weight: float = 1e4,
) -> jax.Array:
  """Adaptive GAN weight: clip(||grad nll|| / (||grad g|| + eps), 0, max_weight) * disc_weight.

  Both gradients are taken w.r.t. the video decoder's last conv kernel (the train step computes them,
  e.g. with `jax.grad` of each loss as a function of that kernel). The result carries no gradient
  (`stop_gradient`, as `.detach()` in the original). The decoder-side regularization has no gradient at
  that kernel, so including it in `nll` or not gives the same weight.

  Args:
      nll_grad, g_grad: arrays (or pytrees of arrays; the norm is then the global L2 norm).
      disc_weight: 0.5 in the released config.
  Returns: scalar float32.
  """
  nll_norm = optax.global_norm(nll_grad).astype(jnp.float32)
  g_norm = optax.global_norm(g_grad).astype(jnp.float32)
  weight = jnp.clip(nll_norm / (g_norm + eps), 0.0, max_weight)
  return jax.lax.stop_gradient(weight) * disc_weight


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
  """1.0 from step `disc_start` on, else 0.0 (float32); `step` may be traced (no recompilation)."""
  return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0).astype(jnp.float32)


def discriminator_loss(
  logits_real: jax.Array, logits_fake: jax.Array, step: jax.Array, disc_start: int
) -> tuple[jax.Array, dict]:
  """Discriminator objective: disc_factor(step) * hinge loss. Logits of `D(x)` and `D(stop_grad(x_hat))`.

  Returns `(loss, metrics)`; metrics: `disc/loss`, `disc/hinge` (before the factor),
  `disc/logits_real`, `disc/logits_fake` (means).
  """
  hinge = hinge_discriminator_loss(logits_real, logits_fake)
  loss = disc_factor(step, disc_start) * hinge
  return loss, {
    "disc/loss": loss,
    "disc/hinge": hinge,
    "disc/logits_real": jnp.mean(logits_real.astype(jnp.float32)),
    "disc/logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
  }


def generator_loss(
  weights: LossWeights,
  *,
  nll: jax.Array,
  kl: jax.Array,
  g_loss: jax.Array,
  d_weight: jax.Array,
  step: jax.Array,
  reg_decoder: Optional[jax.Array] = None,
  reg_encoder: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict]:
  """Combines the generator (autoencoder) terms into the total loss.

    total = nll + d_weight * disc_factor(step, disc_start) * g_loss + kl_weight * kl
        + reg_decoder_weight * reg_decoder + reg_encoder_weight * reg_encoder

  Args:
      weights: a `LossWeights`.
      nll: `reconstruction_nll(...)[0]`.
      kl: `kl_loss(mean, logvar)`.
      g_loss: `generator_adversarial_loss(D(x_hat))` (the trainer passes 0 before disc_start, where its weight is 0
    and it skips the discriminator).
      d_weight: `adaptive_generator_weight(grad nll, grad g, weights.disc_weight, ...)` (already times
    disc_weight, without gradient).
      step: the training step (may be traced).
      reg_decoder: `decoder_regularization(...)[0]`; may be None only when `reg_decoder_weight` is 0.
      reg_encoder: `reconstruction_nll` of the decode of `encoder_regularization_latent(...)` against x;
    may be None only when `reg_encoder_weight` is 0.

  Returns:
      `(total, metrics)`; metrics hold every raw term (`loss/nll`, `loss/kl`, `loss/g`,
      `loss/reg_decoder`, `loss/reg_encoder`), every weighted term (`weighted/...`, summing to
      `loss/total`), and `scalars/d_weight`, `scalars/disc_factor`.
  """
  def term(value, weight, name):
    if value is None:
      if weight != 0:
        raise ValueError(f"expected a {name} loss for {name}_weight={weight}, got None")
      return jnp.zeros((), jnp.float32)
    return jnp.asarray(value, jnp.float32)

  reg_decoder = term(reg_decoder, weights.reg_decoder_weight, "reg_decoder")
  reg_encoder = term(reg_encoder, weights.reg_encoder_weight, "reg_encoder")
  nll = jnp.asarray(nll, jnp.float32)
  kl = jnp.asarray(kl, jnp.float32)
  g_loss = jnp.asarray(g_loss, jnp.float32)
  d_weight = jnp.asarray(d_weight, jnp.float32)
  factor = disc_factor(step, weights.disc_start)

  weighted = {
    "weighted/nll": nll,
    "weighted/g": d_weight * factor * g_loss,
    "weighted/kl": weights.kl_weight * kl,
    "weighted/reg_decoder": weights.reg_decoder_weight * reg_decoder,
    "weighted/reg_encoder": weights.reg_encoder_weight * reg_encoder,
  }
  total = sum(weighted.values())
  metrics = {
    "loss/total": total,
    "loss/nll": nll,
    "loss/kl": kl,
    "loss/g": g_loss,
    "loss/reg_decoder": reg_decoder,
    "loss/reg_encoder": reg_encoder,
    "scalars/d_weight": d_weight,
    "scalars/disc_factor": factor,
    **weighted,
  }
  return total, metrics
