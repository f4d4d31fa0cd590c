r"""Evaluate a VAE (and a baseline) on your data: `python evaluate.py --model PATH --data DATA --out DIR [...]`.

The same command as `cvvae-eval`; see `cvvae_jax/eval/cli.py` for the flags.
"""
import sys

from cvvae_jax.eval import cli

if __name__ == "__main__":
  sys.exit(cli.main())
