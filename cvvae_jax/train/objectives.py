"""The training objectives of one batch, composed from the loss terms (`losses.py`, `regularizer.py`): the
generator's (the VAE and its learned log-variances) and the discriminator's. Pure functions of params and arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cvvae_jax.models import conv_ops, layers, lpips, partitioning, remat as remat_lib
from cvvae_jax.models.sd_vae import image_style
from cvvae_jax.models.vae3d import CVVAE, variant_style
from cvvae_jax.train import losses, regularizer
from cvvae_jax.train.build import Models

Array = jax.Array


def decoder_style(vae) -> layers.ConvStyle:
  return variant_style(vae.variant).decoder if isinstance(vae, CVVAE) else image_style(vae.padding)


def model_input(models: Models, video: Array) -> Array:
  """Batch video `[B, T, H, W, 3]` -> the trained model's input (images `[B, H, W, 3]` for the image VAE)."""
  if models.is_video:
    return video
  if video.shape[1] != 1:
    raise ValueError(f"the image VAE trains on 1-frame batches, got video of shape {video.shape}")
  return video[:, 0]


def reconstruct(models: Models, vae_params, x: Array, rng: Array | None):
  """(x_hat, posterior, z, conv_out_input): one VAE pass, sampling z when `rng` is given."""
  post = models.vae.apply({"params": vae_params}, x, method="encode")
  z = post.sample(rng) if rng is not None else post.mode()
  x_hat, inter = models.vae.apply({"params": vae_params}, z, method="decode", mutable=["intermediates"])
  return x_hat, post, z, inter["intermediates"]["decoder"]["conv_out_input"][0]


def generator_objective(params, disc_params, frozen, x: Array, rng: Array, step: Array, models: Models):
  """The generator objective of one batch -> (total, metrics). `x` is the model input in [-1, 1]."""
  w = models.weights
  rng_post, rng_psi = jax.random.split(rng)
  x_hat, post, z, h = reconstruct(models, params["vae"], x, rng_post)

  remat = models.vae.remat  # the `full` policies run the frozen loss networks one frame at a time, recomputed
  perceptual = None
  if w.perceptual_weight:
    lpips_of = lambda a, b: lpips.lpips_distance(frozen["lpips"], a, b, dtype=models.vae.dtype)
    perceptual = lambda a, b: remat_lib.checkpointed_map(lpips_of, remat, a, b, chunk=models.remat_frames)
    if x.ndim == 5 and 0 < w.perceptual_frames < x.shape[1]:  # LPIPS on a random subset of each clip's frames
      perceptual = losses.frame_subset_perceptual(perceptual, jax.random.fold_in(rng, 1), x.shape[1],
                                                  w.perceptual_frames)
  nll_of = lambda xh, logvar: losses.reconstruction_nll(x, xh, logvar, perceptual, w.perceptual_weight)
  disc = models.disc.clone(remat=remat_lib.frozen(models.disc.remat))  # its parameters get no gradient here
  gan_of = lambda xh: losses.generator_adversarial_loss(disc.apply({"params": disc_params}, xh))
  # The loss networks on the reconstruction (L1 + LPIPS; the discriminator from disc_start on) run once, with their
  # gradients w.r.t. it, in the forward pass (`losses.with_gradient` sends those back through the decoder): the
  # adaptive weight reuses the same gradients instead of differentiating the networks a second time.
  xh, logvar = jax.lax.stop_gradient(x_hat), jax.lax.stop_gradient(params["logvar"])
  (nll, rec_metrics), (nll_grad, logvar_grad) = jax.value_and_grad(nll_of, (0, 1), has_aux=True)(xh, logvar)
  nll = losses.with_gradient(losses.with_gradient(nll, nll_grad, x_hat), logvar_grad, params["logvar"])

  def gan_terms(xh, nll_grad):
    """(g_loss, its gradient w.r.t. x_hat, the adaptive weight ||grad nll|| / (||grad g|| + eps) at the decoder's
    last conv kernel, by the chain rule through it)."""
    g_loss, g_grad = jax.value_and_grad(gan_of)(xh)
    kernel = partitioning.gather_at_use(jax.lax.stop_gradient(params["vae"]["decoder"]["conv_out"]["kernel"]),
                                        models.vae.activation_sharding)
    bias = jax.lax.stop_gradient(params["vae"]["decoder"]["conv_out"]["bias"])
    conv = lambda k: conv_ops.conv_apply(jax.lax.stop_gradient(h), k, bias, padding=decoder_style(models.vae)
                                         .main_padding(), dtype=models.vae.dtype, impl=models.vae.conv_impl)
    _, conv_vjp = jax.vjp(conv, kernel)
    d_weight = losses.adaptive_generator_weight(
        conv_vjp(nll_grad.astype(models.vae.dtype))[0], conv_vjp(g_grad.astype(models.vae.dtype))[0],
        w.disc_weight, eps=w.adaptive_weight_eps, max_weight=w.adaptive_weight_max)
    return jnp.asarray(g_loss, jnp.float32), g_grad, d_weight

  # Before disc_start the GAN term has weight 0: the discriminator and the adaptive weight are skipped at run time
  # (a cond in one compiled step, not a recompile, and not differentiated: its operands are constants of the
  # gradient): pre-GAN steps run no discriminator, and `loss/g` reads 0 there.
  gan_on = losses.disc_factor(step, w.disc_start) > 0
  no_gan = lambda xh, _: (jnp.zeros((), jnp.float32), jnp.zeros_like(xh), jnp.zeros((), jnp.float32))
  g_loss, g_grad, d_weight = jax.lax.cond(gan_on, gan_terms, no_gan, xh, nll_grad)
  g_loss = losses.with_gradient(g_loss, g_grad, x_hat)
  kl = losses.kl_loss(post.mean, post.logvar)

  reg_decoder = reg_encoder = None
  reg_metrics = {}
  if models.image_vae is not None and w.reg_decoder_weight:
    decode_of = lambda latents: models.image_vae.apply({"params": frozen["image_vae"]}, latents, method="decode")
    image_decode = lambda latents: remat_lib.checkpointed_map(decode_of, remat, latents, chunk=models.remat_frames)
    reg_decoder, aux = regularizer.decoder_regularization(z, x, image_decode, w.psi, rng_psi, params["logvar_2d"])
    reg_metrics.update(aux.metrics)
  if models.image_vae is not None and w.reg_encoder_weight:
    image_encode = lambda images: models.image_vae.apply({"params": frozen["image_vae"]}, images,
                                                         method="encode").mode()
    latent = regularizer.encoder_regularization_latent(x, image_encode, w.psi, rng_psi)
    x_from_image = models.vae.apply({"params": params["vae"]}, latent, method="decode")
    reg_encoder, _ = losses.reconstruction_nll(x, x_from_image, params["logvar"], perceptual, w.perceptual_weight)

  total, metrics = losses.generator_loss(w, nll=nll, kl=kl, g_loss=g_loss, d_weight=d_weight, step=step,
                                         reg_decoder=reg_decoder, reg_encoder=reg_encoder)
  return total, {**metrics, **rec_metrics, **reg_metrics}


def discriminator_objective(disc_params, vae_params, x: Array, rng: Array, step: Array, models: Models):
  """The discriminator objective of one batch (the reconstruction is a constant here)."""
  x_hat, *_ = reconstruct(models, jax.lax.stop_gradient(vae_params), x, jax.random.split(rng)[0])
  logits_real = models.disc.apply({"params": disc_params}, x)
  logits_fake = models.disc.apply({"params": disc_params}, jax.lax.stop_gradient(x_hat))
  return losses.discriminator_loss(logits_real, logits_fake, step, models.weights.disc_start)

