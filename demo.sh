#!/usr/bin/env bash
# The whole demo on a laptop CPU (about 10 minutes on 2 cores), on real clips and photos that pip packages ship:
#   1. train a small SD-architecture image VAE on the embedded photos,
#   2. inflate it into a small CV-VAE and train that with the frozen image VAE as the latent regularizer,
#   3. export the CV-VAE to the original PyTorch layout and load it back.
# usage: bash demo.sh [WORKDIR]   (default ./workdir_demo)
set -euo pipefail
cd "$(dirname "$0")"
W=${1:-workdir_demo}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
python train.py --config configs/image_vae.py:demo --workdir "$W/image_vae"
python train.py --config configs/cvvae.py:demo --workdir "$W/cvvae" --config.image_vae.path="$W/image_vae"
python -m cvvae_jax.convert "$W/cvvae" "$W/cvvae_torch" --to torch
python - "$W" <<'PY'
import sys, cvvae_jax
w = sys.argv[1]
vae, params = cvvae_jax.load_pretrained(f"{w}/cvvae_torch")
print(f"loaded the exported PyTorch folder {w}/cvvae_torch: {type(vae).__name__}({vae.variant}), "
      f"latent channels {vae.latent_channels}")
print(f"pictures: {w}/cvvae/images/, loss curves: {w}/image_vae/loss_curves.png, {w}/cvvae/loss_curves.png")
PY
