"""cvvae-jax: a JAX/Flax reimplementation of CV-VAE (NeurIPS 2024)."""
