"""Reconstruct a video file through a VAE: read (PyAV), encode, decode, write an mp4, print PSNR and timing.

    cvvae-reconstruct --model PATH --input IN.mp4 --out OUT.mp4 \
        [--frames 17] [--stride 1] [--resolution 256] [--tiling tiled|original|exact] [--tile 576] [--chunk 17] \
        [--dtype float32|bfloat16] [--conv_impl auto|xla|cpu|...] (or: python -m cvvae_jax.reconstruct ...)

`--model` is anything `load_pretrained` reads (an original PyTorch folder, our Flax export, a training workdir).
CV-VAE models code the clip as a video (1 + 4k frames: extra frames are dropped); the image VAE codes it frame by
frame. Prints one JSON line with the PSNR (dB, frames in [0, 1]), the frame count and size, and timings in seconds
(the first encode/decode includes compilation; a second, timed pass is made with `--repeat 2`). The older flag
names `--output`, `--size` and `--mode` still work.
"""
from __future__ import annotations

import json
import sys
import time

import jax

from cvvae_jax import cli, metrics
from cvvae_jax.data import media
from cvvae_jax.inference import api, plan, tiling
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.weights.pretrained import load_pretrained


def parser():
  p = cli.parser("cvvae-reconstruct", __doc__)
  cli.add_model_argument(p)
  p.add_argument("--input", required=True, help="input video file")
  p.add_argument("--out", "--output", required=True, help="output .mp4")
  cli.add_clip_arguments(p, frames=None, stride=1, resolution=None, multiple=8,
                         resolution_help="the video's size cropped to multiples of 8",
                         aliases={"--resolution": ("--size",)})
  plan.add_tiling_arguments(p, aliases={"--tiling": ("--mode",)}, follow_model=True)
  cli.add_dtype_argument(p)
  cli.add_conv_impl_argument(p)
  p.add_argument("--repeat", type=int, default=1, help="passes to time (the first one compiles)")
  return p


def run(args) -> dict:
  """Reads, codes and writes the clip `args` name; returns what `main` prints."""
  config = plan.TilingConfig.from_options(args.tiling, args.tile, args.chunk, args.overlap)
  video = media.read_video(args.input, num_frames=args.frames, stride=args.stride, size=args.resolution)
  fps = media.video_info(args.input).fps / args.stride
  model, params = load_pretrained(args.model)
  is_video = isinstance(model, CVVAE)
  sc = model.spatial_compression
  h, w = (video.shape[1] // sc) * sc, (video.shape[2] // sc) * sc
  if h < sc or w < sc:
    raise ValueError(f"{args.input}: frames of {video.shape[1]}x{video.shape[2]} are smaller than {sc}x{sc}")
  video = media.center_crop(video, (h, w))
  if is_video:
    tc = model.temporal_compression
    t = 1 + (video.shape[0] - 1) // tc * tc
    video = video[:t]
  x = video[None]
  kw = dict(tiling=config, dtype=args.dtype, conv_impl=args.conv_impl, image_mode=not is_video)
  times = {"encode_s": [], "decode_s": []}
  for _ in range(max(1, args.repeat)):
    start = time.perf_counter()
    z = api.encode_streaming(model, params, x, progress=tiling.chunk_progress("encode"), **kw)
    times["encode_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    out = api.decode_streaming(model, params, z, progress=tiling.chunk_progress("decode"), **kw)
    times["decode_s"].append(time.perf_counter() - start)
  out = out[0]
  media.write_video(args.out, out, fps=fps or 24.0)
  chunks = api.plan_for(model, x.shape, encoder=True, tiling=config, image_mode=not is_video)
  psnr = float(metrics.psnr(video, out, axis=range(video.ndim)))
  return {
      "input": args.input, "output": args.out, "model": type(model).__name__, "frames": int(out.shape[0]),
      "height": h, "width": w, "latent_shape": list(z.shape[1:]), "psnr_db": round(psnr, 3),
      "encode_s": [round(t, 3) for t in times["encode_s"]], "decode_s": [round(t, 3) for t in times["decode_s"]],
      "dtype": args.dtype, "conv_impl": args.conv_impl, "plan": str(chunks), "backend": jax.default_backend(),
  }


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  return cli.run(lambda: print(json.dumps(run(args))))


if __name__ == "__main__":
  sys.exit(main())
