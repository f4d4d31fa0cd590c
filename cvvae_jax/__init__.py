"""cvvae-jax: a JAX/Flax reimplementation of CV-VAE (NeurIPS 2024).

    import cvvae_jax
    vae, params = cvvae_jax.load_pretrained(path)
    posterior = vae.apply({"params": params}, video, method="encode")   # video [B, 1+4k, H, W, 3] in [-1, 1]
    frames = vae.apply({"params": params}, z, method="decode")           # z [B, 1+k, H/8, W/8, C]
    cvvae_jax.save_pretrained(vae, params, out_dir)                      # the original PyTorch folder layout

Subpackages, from the bottom up: `models` and `data`; `weights` and `inference` above them; `train` and `eval` on
top. Importing `cvvae_jax` loads the models and weights only.
"""
from cvvae_jax.models.distributions import DiagonalGaussian
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.weights.pretrained import load_pretrained, save_flax, save_pretrained

__version__ = "0.12.0"

__all__ = ["CVVAE", "ImageVAE", "DiagonalGaussian", "load_pretrained", "save_pretrained", "save_flax", "__version__"]
