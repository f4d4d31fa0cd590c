r"""Train CV-VAE (or the SD image VAE): `python train.py --config configs/cvvae.py[:sd21|sd3,full|demo] --workdir DIR`.

The same command as `cvvae-train`; see `cvvae_jax/train/cli.py` for the flags.
"""
from cvvae_jax.train import cli

if __name__ == "__main__":
  cli.main()
