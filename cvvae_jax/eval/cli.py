r"""Evaluate a VAE (and a baseline) on your data: PSNR / SSIM / LPIPS (the paper's Table 1) and latent compatibility.

    cvvae-eval --model PATH [--baseline PATH] [--image_vae PATH|none] --data FOLDER|TFDS_NAME|embedded \
        --out DIR [--frames 33] [--stride 3] [--resolution 256] [--max_clips N] [--batch_size 1] \
    [--protocol webvid|coco] [--lpips_net vgg|alex] [--no-fvd]             (or: python evaluate.py ...)

Writes metrics.json, metrics.md, per_frame.png, per_clip_hist.png and samples/ into --out and prints metrics.md;
with rFVD, per-clip I3D features in features.npz. Several processes (JAX_COORDINATOR_ADDRESS ..., as for training)
each read their share of the clips. See `cvvae_jax/eval/__init__.py` for what every number means.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
from absl import logging

from cvvae_jax import cli, distributed, paths
from cvvae_jax.eval import run
from cvvae_jax.eval.config import COMPAT_PSI, PROTOCOLS, EvalConfig
from cvvae_jax.inference import plan
from cvvae_jax.models import lpips

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig)}


def parser():
  d = _DEFAULTS
  p = cli.parser("cvvae-eval", __doc__)
  cli.add_model_argument(p)
  cli.add_model_argument(p, "--baseline", required=False, help="a baseline model, the same kinds as --model (e.g. "
                         "the SD image VAE)")
  cli.add_model_argument(p, "--image_vae", required=False, help="the frozen image VAE of the compatibility metrics; "
                         "default: the baseline (or model) if it is an image VAE, else the image_vae.path "
                         "recorded in a training workdir; 'none': off")
  p.add_argument("--data", required=True, help="a folder of videos or images, a prepared TFDS name (e.g. coco/2017), "
                 "or 'embedded' / 'embedded:video' / 'embedded:image'")
  p.add_argument("--out", required=True, help="the output folder")
  cli.add_clip_arguments(p, frames=d["frames"], stride=d["stride"], resolution=str(d["resolution"][0]))
  p.add_argument("--max_clips", type=int, default=d["max_clips"], help="stop after this many usable clips (0: all)")
  p.add_argument("--batch_size", type=int, default=d["batch_size"], help="clips per step")
  p.add_argument("--data_kind", default=d["data_kind"], choices=("auto", "video", "image"),
                 help="the kind of --data (auto: from the files)")
  p.add_argument("--split", default=d["split"], help="TFDS split (default: validation, else test, else train)")
  p.add_argument("--data_dir", default=d["data_dir"], help="TFDS data_dir")
  p.add_argument("--data_key", default=d["data_key"], help="TFDS feature with the encoded files (default: data, else "
                 "image)")
  plan.add_tiling_arguments(p, follow_model=True)
  cli.add_dtype_argument(p)
  cli.add_conv_impl_argument(p)
  p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=d["lpips"], help="compute LPIPS")
  p.add_argument("--lpips_net", default=d["lpips_net"], choices=lpips.NETS, help="LPIPS backbone: VGG16 or AlexNet")
  p.add_argument("--fvd", action=argparse.BooleanOptionalAction, default=d["fvd"],
                 help="compute rFVD (I3D features; clips of >= 9 frames)")
  p.add_argument("--fvd_bootstrap", type=int, default=d["fvd_bootstrap"],
                 help="bootstrap resamples of the rFVD's 95%% interval (0: none)")
  p.add_argument("--protocol", default="", choices=("", *sorted(PROTOCOLS)),
                 help="a Table-1 protocol: webvid (33 frames, stride 3, 256x256) or coco (images, 256x256); its "
                 "settings are the defaults of --frames, --stride, --resolution, --data_kind, and the report shows the "
                 "paper's figures beside ours")
  p.add_argument("--devices", type=int, default=d["devices"],
                 help="devices per process to shard each batch over (0: as many as divide this process's share)")
  p.add_argument("--compat_psi", type=lambda s: tuple(filter(None, s.split(","))), default=d["compat_psi"],
                 help=f"psi targets of the compatibility metrics, comma-separated (some of {', '.join(COMPAT_PSI)}; "
                 f"default {','.join(d['compat_psi'])})")
  p.add_argument("--num_samples", type=int, default=d["num_samples"], help="clips written as sample strips (PNG, mp4)")
  p.add_argument("--sample_frames", type=int, default=d["sample_frames"], help="frame columns in the PNG strips")
  p.add_argument("--fps", type=float, default=d["fps"], help="frame rate of the sample mp4s")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d["progress"],
                 help="progress bar with ETA on stderr")
  return p


def parse_args(argv=None):
  """The command line; `--protocol`'s settings become the defaults of their flags (flags given still win)."""
  p = parser()
  protocol = p.parse_known_args(argv)[0].protocol
  if protocol:
    preset = dict(PROTOCOLS[protocol])
    preset["resolution"] = "x".join(map(str, preset["resolution"]))
    p.set_defaults(**preset)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.show_info_logs()
  distributed.initialize()
  fields = {f.name for f in dataclasses.fields(EvalConfig)}

  def evaluate() -> None:
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in fields})
    report = run.evaluate(cfg)
    if jax.process_index() == 0:  # process 0 writes the outputs
      print((paths.path(args.out) / "metrics.md").read_text())
    logging.info("evaluate: %d clips in %.1f s", report["data"]["num_clips"], report["timing"]["total_s"])

  return cli.run(evaluate)


if __name__ == "__main__":
  sys.exit(main())
