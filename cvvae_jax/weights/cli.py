"""Convert model files between the original PyTorch folder layout and our Flax format.

    cvvae-convert SRC OUT --to {torch,flax}        (or: python -m cvvae_jax.convert ...)
    cvvae-convert AILab-CVC/CV-VAE out --subfolder vae3d_sd3 --to torch --dtype bf16

SRC is anything `load_pretrained` reads: an original PyTorch folder (config.json + diffusion_pytorch_model.safetensors
of CVVAEModel, CVVAESD3Model or a diffusers AutoencoderKL), our Flax export (model.json + params/), or a training
workdir (its latest checkpoint's params), locally or by Hugging Face Hub id (`--subfolder`, `--revision`,
`--variant`). `--to torch` writes the original folder layout (`--dtype`: float32, fp16 or bf16 tensors), `--to flax`
our export.
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from cvvae_jax import cli
from cvvae_jax.weights import pretrained, weight_files


def parser():
  p = cli.parser("cvvae-convert", __doc__)
  p.add_argument("src", help="the model to read: an original PyTorch folder, our Flax export or a training workdir")
  p.add_argument("out", help="the folder to write")
  p.add_argument("--to", choices=("torch", "flax"), required=True,
                 help="torch: the original folder layout; flax: our export (model.json + an Orbax checkpoint)")
  p.add_argument("--subfolder", default=None, help="the model's folder inside SRC (e.g. vae3d_sd3 of AILab-CVC/CV-VAE)")
  p.add_argument("--revision", default=None, help="a Hub branch, tag or commit of SRC (Hub ids only)")
  p.add_argument("--variant", default=None, help="read diffusion_pytorch_model.<variant>.safetensors (e.g. fp16)")
  p.add_argument("--dtype", default=None, choices=sorted(weight_files.SAVE_DTYPES),
                 help="--to torch: the dtype of the written tensors (default float32)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)

  def convert() -> None:
    model, params = pretrained.load_pretrained(args.src, subfolder=args.subfolder, revision=args.revision,
                                               variant=args.variant)
    if args.to == "torch":
      pretrained.save_pretrained(model, params, args.out, dtype=args.dtype)
    elif args.dtype is not None:
      raise ValueError("--dtype is for --to torch (our Flax export keeps the params' dtype)")
    else:
      pretrained.save_flax(model, params, args.out)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out} ({args.to}): {type(model).__name__}, {n:,} parameters")

  return cli.run(convert)


if __name__ == "__main__":
  sys.exit(main())
