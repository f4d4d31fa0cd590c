r"""Train CV-VAE (or the SD image VAE): `cvvae-train --config configs/cvvae.py[:sd21|sd3,full|demo] --workdir DIR`.

(or `python train.py ...`). Any config field can be overridden: `--config.train.num_steps=1000
--config.image_vae.path=/weights/sd21_vae`. The workdir's latest checkpoint is resumed automatically;
`cvvae_jax.load_pretrained(DIR)` loads its params and `cvvae-convert DIR OUT --to torch` exports them in the original
PyTorch layout. `--compilation_cache DIR` keeps compiled programs for later runs (JAX's persistent cache). A config or
data error ends the run with one line `error: ...` (CVVAE_DEBUG=1: the traceback).
"""
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags


from cvvae_jax import cli, distributed
from cvvae_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/cvvae.py or configs/image_vae.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache: a later run of the "
                    "same program (a restart, the next run) loads its compiled steps instead of compiling them again "
                    "(default: $JAX_COMPILATION_CACHE_DIR, else none).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO records of libraries that log every checkpoint/save step (orbax), keeping warnings; Orbax's errors
  keep their line but lose their traceback (a failed save is reported once, as `error: ...`), unless CVVAE_DEBUG=1."""

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.exc_info and not os.environ.get(cli.DEBUG_ENV):
      record.exc_info, record.exc_text = None, None
    return record.levelno >= 30


def _main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  cli.quiet_io_logs()  # gcsfs / fsspec: INFO per file read on a bucket
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
  distributed.initialize()
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # INFO logs from process 0 only; warnings and errors from all
  logging.info("config:\n%s", FLAGS.config)

  def train() -> None:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)

  status = cli.run(train, error_status=1)
  if status:
    sys.exit(status)


def main() -> None:
  """The `cvvae-train` entry point (also `python train.py`)."""
  # Shown by --help, which describes the flags of the script that runs.
  for name in ("config", "workdir", "compilation_cache"):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  app.run(_main)


if __name__ == "__main__":
  main()
