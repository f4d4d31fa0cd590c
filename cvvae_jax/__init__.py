"""cvvae-jax: a JAX/Flax reimplementation of CV-VAE (NeurIPS 2024).

    import cvvae_jax
    vae, params = cvvae_jax.load_pretrained(path)
    posterior = vae.apply({"params": params}, video, method="encode")   # video [B, 1+4k, H, W, 3] in [-1, 1]
    frames = vae.apply({"params": params}, z, method="decode")           # z [B, 1+k, H/8, W/8, C]
    cvvae_jax.save_pretrained(vae, params, out_dir)                      # the original PyTorch folder layout
"""
from cvvae_jax.distributions import DiagonalGaussian
from cvvae_jax.pretrained import load_pretrained, save_flax, save_pretrained
from cvvae_jax.sd_vae import ImageVAE
from cvvae_jax.vae3d import CVVAE

__all__ = ["CVVAE", "ImageVAE", "DiagonalGaussian", "load_pretrained", "save_pretrained", "save_flax"]
