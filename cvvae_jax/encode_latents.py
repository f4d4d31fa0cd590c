"""`python -m cvvae_jax.encode_latents ...`: encode a video dataset to latent shards (`cvvae_jax.latents.encode`)."""
import sys

from cvvae_jax.latents.encode import EncodeConfig, encode_dataset, main, parser

__all__ = ["EncodeConfig", "encode_dataset", "main", "parser"]

if __name__ == "__main__":
  sys.exit(main())
