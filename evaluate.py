r"""Evaluate a VAE (and a baseline) on your data: PSNR / SSIM / LPIPS (the paper's Table 1) and latent compatibility.

    python evaluate.py --model PATH [--baseline PATH] [--image_vae PATH|none] --data FOLDER|TFDS_NAME|embedded \
        --out DIR [--frames 33] [--stride 3] [--resolution 256] [--max_clips N] [--batch_size 1]

Writes metrics.json, metrics.md, per_frame.png, per_clip_hist.png and samples/ into --out; see
`cvvae_jax/evaluation.py` for what every number means.
"""
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model: an original PyTorch folder (CV-VAE or SD image VAE), our Flax export, or "
                    "a training workdir.")
flags.DEFINE_string("baseline", "", "Baseline model, same kinds as --model (e.g. the SD image VAE).")
flags.DEFINE_string("image_vae", "", "Frozen image VAE for the compatibility metrics; default: the baseline (or model) "
                    "if it is an image VAE, else the image_vae.path recorded in a training workdir; 'none': off.")
flags.DEFINE_string("data", None, "A folder of videos or images, a prepared TFDS name (e.g. coco/2017), or "
                    "'embedded' / 'embedded:video' / 'embedded:image'.")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("frames", 33, "Frames per clip (1 + 4k for a CV-VAE); images are 1 frame.")
flags.DEFINE_integer("stride", 3, "Frame stride.")
flags.DEFINE_string("resolution", "256", "S (short side S, centre crop SxS) or HxW.")
flags.DEFINE_integer("max_clips", 0, "Stop after this many usable clips (0: all).")
flags.DEFINE_integer("batch_size", 1, "Clips per step.")
flags.DEFINE_enum("data_kind", "auto", ["auto", "video", "image"], "Kind of --data (auto: from the files).")
flags.DEFINE_string("split", "", "TFDS split (default: validation, else test, else train).")
flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
flags.DEFINE_string("data_key", "", "TFDS feature with the encoded files (default: data, else image).")
flags.DEFINE_enum("tiling", "tiled", ["tiled", "original", "exact"], "Chunking/tiling mode (cvvae_jax.tiling).")
flags.DEFINE_integer("tile", 576, "Spatial tile in pixels (0: no tiling).")
flags.DEFINE_integer("chunk", 17, "Frames per encoder chunk, 1 + 4m (0: no chunking); the decoder uses 1 + m latents.")
flags.DEFINE_float("overlap", 0.2222, "Tile overlap ratio.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the VAEs.")
flags.DEFINE_bool("lpips", True, "Compute LPIPS (VGG16).")
flags.DEFINE_list("compat_psi", ["slice", "mean"], "psi targets of the compatibility metrics (slice, mean, first).")
flags.DEFINE_integer("num_samples", 4, "Clips written as sample strips (PNG, mp4).")
flags.DEFINE_integer("sample_frames", 9, "Frame columns in the PNG strips.")
flags.DEFINE_float("fps", 8.0, "Frame rate of the sample mp4s.")
flags.DEFINE_bool("progress", True, "Progress bar with ETA on stderr.")
flags.mark_flags_as_required(["model", "data", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cvvae_jax import evaluation

  try:
    cfg = evaluation.EvalConfig(
        model=FLAGS.model, baseline=FLAGS.baseline, image_vae=FLAGS.image_vae, data=FLAGS.data, out=FLAGS.out,
        frames=FLAGS.frames, stride=FLAGS.stride, resolution=FLAGS.resolution, max_clips=FLAGS.max_clips,
        batch_size=FLAGS.batch_size, data_kind=FLAGS.data_kind, split=FLAGS.split, data_dir=FLAGS.data_dir,
        data_key=FLAGS.data_key, tiling=FLAGS.tiling, tile=FLAGS.tile, chunk=FLAGS.chunk, overlap=FLAGS.overlap,
        dtype=FLAGS.dtype, lpips=FLAGS.lpips, compat_psi=tuple(FLAGS.compat_psi), num_samples=FLAGS.num_samples,
        sample_frames=FLAGS.sample_frames, fps=FLAGS.fps, progress=FLAGS.progress)
    report = evaluation.evaluate(cfg)
  except evaluation.EvaluationError as e:
    sys.exit(f"error: {e}")
  with open(f"{FLAGS.out}/metrics.md") as f:
    print(f.read())
  logging.info("evaluate: %d clips in %.1f s", report["data"]["num_clips"], report["timing"]["total_s"])


if __name__ == "__main__":
  app.run(main)
