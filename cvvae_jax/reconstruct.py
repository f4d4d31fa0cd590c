"""The old path of `cvvae_jax.inference.reconstruct`: `python -m cvvae_jax.reconstruct ...` runs it."""
import sys

from cvvae_jax.inference.reconstruct import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
  sys.exit(main())
