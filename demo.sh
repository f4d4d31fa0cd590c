#!/usr/bin/env bash
# The whole demo on a laptop CPU (about 9 minutes on 2 cores with an empty compilation cache), on real clips
# that a pip package ships:
#   1. train a small SD-architecture image VAE on single frames of the embedded training clips,
#   2. inflate it into a small CV-VAE and train that with the frozen image VAE as the latent regularizer,
#   3. export the CV-VAE to the original PyTorch layout and load it back,
#   4. evaluate it and the image VAE on the 9 held-out clips (never trained on): table and side-by-side strips.
# usage: bash demo.sh [WORKDIR]   (default ./workdir_demo)
set -euo pipefail
cd "$(dirname "$0")"
W=${1:-workdir_demo}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# JAX's persistent compilation cache: a second run of the demo skips most of its compiling.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/cvvae_jax/jax_cache}
TIMES=""
stage() {  # stage NAME COMMAND...: runs it and adds its wall time to the summary printed at the end
  local name=$1 start=$SECONDS
  shift
  "$@"
  TIMES="$TIMES${TIMES:+, }$name $((SECONDS - start)) s"
}
stage "image VAE" python train.py --config configs/image_vae.py:demo --workdir "$W/image_vae"
stage "CV-VAE" python train.py --config configs/cvvae.py:demo --workdir "$W/cvvae" --config.image_vae.path="$W/image_vae"
stage "export" python -m cvvae_jax.convert "$W/cvvae" "$W/cvvae_torch" --to torch
stage "reload" python - "$W" <<'PY'
import sys, cvvae_jax
w = sys.argv[1]
vae, params = cvvae_jax.load_pretrained(f"{w}/cvvae_torch")
print(f"loaded the exported PyTorch folder {w}/cvvae_torch: {type(vae).__name__}({vae.variant}), "
      f"latent channels {vae.latent_channels}")
PY
stage "evaluation" python evaluate.py --model "$W/cvvae" --baseline "$W/image_vae" --data embedded --out "$W/eval" \
    --frames 17 --stride 1 --resolution 64 --lpips_net alex --no-fvd --num_samples 9 --no-progress
sed -n '/^| Method/,/^$/p' "$W/eval/metrics.md"
echo "held-out strips (rows: input, CV-VAE, its error, image VAE, its error): $W/eval/samples/sample_00.png (bigbuckbunny)," \
     "sample_03.png (bikes), sample_06.png (carphone); all numbers: $W/eval/metrics.md"
echo "training pictures: $W/cvvae/images/, loss curves: $W/image_vae/loss_curves.png, $W/cvvae/loss_curves.png"
echo "demo wall time: $TIMES; total $SECONDS s"
