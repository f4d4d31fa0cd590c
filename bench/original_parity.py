"""Our ORIGINAL tiling mode against the original CV-VAE code's own `encode`/`decode` (chunking + tiling).

    python bench/original_parity.py --original_repo /path/to/CV-VAE [--model FOLDER]

The original code is imported from a user-given checkout (never vendored). Its attention calls xformers, which is
CUDA-only; this script provides `xformers.ops.memory_efficient_attention` as torch's scaled_dot_product_attention
(the same single-head softmax attention, scale 1/sqrt(C)). Small tiles and chunks (64 px, overlap 0.25, 9 frames /
3 latents) are set on both sides so that a small input exercises the original's chunk boundaries, cut-off last tiles
and sequential blends. `--model` defaults to the tiny golden SD2.1 twin made by
shared/reference/golden/make_weights.py. Prints one JSON line with the max abs differences.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import torch_original  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--original_repo", default=os.environ.get("CVVAE_ORIGINAL_REPO", ""))
  p.add_argument("--model", default="", help="original-layout CV-VAE folder (default: the tiny golden twin)")
  p.add_argument("--shape", default="17,96,136", help="T,H,W of the random input video")
  args = p.parse_args()
  cls = torch_original.load_original_class(args.original_repo)
  if cls is None:
    print(json.dumps({"skipped": f"original CV-VAE code not found at --original_repo={args.original_repo!r}"}))
    return
  import torch
  import jax
  import cvvae_jax
  from cvvae_jax import inference
  from cvvae_jax.inference.plan import TilingConfig

  model_dir = args.model
  if not model_dir:
    model_dir = os.path.join(tempfile.mkdtemp(), "cvvae_sd21_tiny")
    here = os.path.dirname(os.path.abspath(__file__))
    maker = os.path.join(here, "..", "..", "shared", "reference", "golden", "make_weights.py")
    subprocess.run([sys.executable, maker, "cvvae_sd21_tiny", model_dir], check=True, capture_output=True)
  torch_model = cls.from_pretrained(model_dir).eval()
  # The original's knobs (config: tile_spatial_size, tile_overlap_ratio, en_de_n_frames_a_time), made small.
  torch_model.pixel_tile_size, torch_model.latent_tile_size, torch_model.tile_overlap_ratio = 64, 8, 0.25
  torch_model.encode_n_frames_a_time, torch_model.decode_n_frames_a_time = 8, 2
  cfg = TilingConfig(mode="original", encode_chunk_frames=9, decode_chunk_latents=3, tile_size=64, overlap=0.25)

  vae, params = cvvae_jax.load_pretrained(model_dir)
  t, h, w = (int(v) for v in args.shape.split(","))
  x = np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
  with torch.no_grad():
    post = torch_model.encode(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).latent_dist
    mean_t = post.mean.permute(0, 2, 3, 4, 1).numpy()
    logvar_t = post.logvar.permute(0, 2, 3, 4, 1).numpy()
    dec_t = torch_model.decode(torch.from_numpy(mean_t).permute(0, 4, 1, 2, 3)).sample.permute(0, 2, 3, 4, 1).numpy()
  ours = inference.posterior_streaming(vae, params, x, tiling=cfg)
  z = vae.scale_latent(mean_t)
  dec = inference.decode_streaming(vae, params, np.asarray(z), tiling=cfg)
  plain = inference.posterior_streaming(vae, params, x, tiling=TilingConfig(mode="exact"))
  plan_e = inference.plan_for(vae, x.shape, encoder=True, tiling=cfg)
  plan_d = inference.plan_for(vae, mean_t.shape, encoder=False, tiling=cfg)
  result = {
      "input": list(x.shape), "encode_plan": str(plan_e), "decode_plan": str(plan_d),
      "mean_max_abs_diff": float(np.abs(ours.mean - mean_t).max()),
      "logvar_max_abs_diff": float(np.abs(ours.logvar - logvar_t).max()),
      "decode_max_abs_diff": float(np.abs(dec - dec_t).max()),
      "mean_scale": float(np.abs(mean_t).max()), "decode_scale": float(np.abs(dec_t).max()),
      "untiled_vs_original_tiled_mean_max_abs_diff": float(np.abs(plain.mean - mean_t).max()),
      "backend": jax.default_backend(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
