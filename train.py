r"""Train CV-VAE (or the SD image VAE): `python train.py --config configs/cvvae.py[:sd21|sd3,full|demo] --workdir DIR`.

Any config field can be overridden: `--config.train.num_steps=1000 --config.image_vae.path=/weights/sd21_vae`.
The workdir's latest checkpoint is resumed automatically; `cvvae_jax.load_pretrained(DIR)` loads its params and
`python -m cvvae_jax.convert DIR OUT --to torch` exports them in the original PyTorch layout.
"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/cvvae.py or configs/image_vae.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO records of libraries that log every checkpoint/save step (orbax), keeping warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging as std_logging

  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  from cvvae_jax import distributed, train_lib

  distributed.initialize()
  import jax

  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # INFO logs from process 0 only; warnings and errors from all
  logging.info("config:\n%s", FLAGS.config)
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
