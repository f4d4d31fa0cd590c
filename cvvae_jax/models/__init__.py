"""Networks (Flax linen): the CV-VAE, the SD image VAE, their shared layers, the GAN discriminator and LPIPS."""
from cvvae_jax.models.distributions import DiagonalGaussian
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE

__all__ = ["CVVAE", "ImageVAE", "DiagonalGaussian"]
