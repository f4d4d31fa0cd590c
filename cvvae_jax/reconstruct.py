"""Reconstruct a video file through a VAE: read (PyAV), encode, decode, write an mp4, print PSNR and timing.

    python -m cvvae_jax.reconstruct --model PATH --input IN.mp4 --output OUT.mp4 \
        [--frames 17] [--stride 1] [--size 256] [--tile 576] [--mode tiled|original|exact] [--dtype float32|bfloat16]

`--model` is anything `load_pretrained` reads (an original PyTorch folder, our Flax export, a training workdir).
CV-VAE models code the clip as a video (1 + 4k frames: extra frames are dropped); the image VAE codes it frame by
frame. Prints one JSON line with the PSNR (dB, frames in [0, 1]), the frame count and size, and timings in seconds
(the first encode/decode includes compilation; a second, timed pass is made with `--repeat 2`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from cvvae_jax import video_io


def _size(text: str) -> tuple[int, int]:
  parts = text.lower().replace(",", "x").split("x")
  try:
    values = [int(p) for p in parts]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a size like 256 or 256x384, got {text!r}") from None
  if len(values) == 1:
    values = values * 2
  if len(values) != 2 or min(values) < 8 or values[0] % 8 or values[1] % 8:
    raise argparse.ArgumentTypeError(f"expected H[xW] multiples of 8 (>= 8), got {text!r}")
  return values[0], values[1]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m cvvae_jax.reconstruct", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="model folder (original PyTorch, Flax export or workdir)")
  p.add_argument("--input", required=True, help="input video file")
  p.add_argument("--output", required=True, help="output .mp4")
  p.add_argument("--frames", type=int, default=None, help="frames to read at most (CV-VAE keeps 1 + 4k of them)")
  p.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
  p.add_argument("--size", type=_size, default=None,
                 help="H[xW]: resize to cover and center-crop (default: the video's size cropped to multiples of 8)")
  p.add_argument("--tile", type=int, default=576, help="spatial tile in pixels (0: no tiling)")
  p.add_argument("--chunk", type=int, default=17, help="frames per encoder chunk, 1 + 4m (0: no chunking); the "
                 "decoder uses 1 + m latents")
  p.add_argument("--overlap", type=float, default=0.2222, help="tile overlap ratio")
  p.add_argument("--mode", default="tiled", choices=["tiled", "original", "exact"], help="see cvvae_jax.tiling")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  p.add_argument("--repeat", type=int, default=1, help="passes to time (the first one compiles)")
  return p


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  a = np.clip((a + 1) / 2, 0, 1)
  b = np.clip((b + 1) / 2, 0, 1)
  mse = float(np.mean((a.astype(np.float64) - b) ** 2))
  return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run(args) -> dict:
  import jax

  from cvvae_jax import inference, load_pretrained
  from cvvae_jax.tiling import TilingConfig, chunk_progress
  from cvvae_jax.vae3d import CVVAE

  video = video_io.read_video(args.input, num_frames=args.frames, stride=args.stride, size=args.size)
  fps = video_io.video_info(args.input).fps / args.stride
  model, params = load_pretrained(args.model)
  is_video = isinstance(model, CVVAE)
  sc = model.spatial_compression
  h, w = (video.shape[1] // sc) * sc, (video.shape[2] // sc) * sc
  if h < sc or w < sc:
    raise ValueError(f"{args.input}: frames of {video.shape[1]}x{video.shape[2]} are smaller than {sc}x{sc}")
  video = video_io.center_crop(video, (h, w))
  if is_video:
    tc = model.temporal_compression
    t = 1 + (video.shape[0] - 1) // tc * tc
    video = video[:t]
  if args.chunk and args.chunk % 4 != 1:
    raise ValueError(f"--chunk must be 1 + 4m frames, got {args.chunk}")
  config = TilingConfig(mode=args.mode, encode_chunk_frames=args.chunk or None,
                        decode_chunk_latents=(args.chunk - 1) // 4 + 1 if args.chunk else None,
                        tile_size=args.tile or None, overlap=args.overlap)
  x = video[None]
  kw = dict(tiling=config, dtype=args.dtype, image_mode=not is_video)
  times = {"encode_s": [], "decode_s": []}
  for _ in range(max(1, args.repeat)):
    start = time.perf_counter()
    z = inference.encode_streaming(model, params, x, progress=chunk_progress("encode"), **kw)
    times["encode_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    out = inference.decode_streaming(model, params, z, progress=chunk_progress("decode"), **kw)
    times["decode_s"].append(time.perf_counter() - start)
  out = out[0]
  video_io.write_video(args.output, out, fps=fps or 24.0)
  plan = inference.plan_for(model, x.shape, encoder=True, tiling=config, image_mode=not is_video)
  return {
      "input": args.input, "output": args.output, "model": type(model).__name__, "frames": int(out.shape[0]),
      "height": h, "width": w, "latent_shape": list(z.shape[1:]), "psnr_db": round(_psnr(out, video), 3),
      "encode_s": [round(t, 3) for t in times["encode_s"]], "decode_s": [round(t, 3) for t in times["decode_s"]],
      "dtype": args.dtype, "plan": str(plan), "backend": jax.default_backend(),
  }


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    result = run(args)
  except (video_io.VideoReadError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
