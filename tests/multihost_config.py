r"""The training config of tests/test_multihost.py, as a file for CLI runs of train.py.

    python scripts/launch_local.py -n 2 -d 4 -- train.py --config tests/multihost_config.py:8 --workdir W

`tiny_config` of tests/train/test_train.py (tiny CV-VAE and discriminator, 5x16x16 clips, global batch 8, LPIPS off,
logs every step, checkpoints every 2 steps) without the latent regularizer and started from scratch, which halves
the train step's compile time (each multi-process launch compiles it afresh). The argument is the number of steps.
"""
from tests.train.test_train import tiny_config


def get_config(arg: str = ""):
  c = tiny_config("", int(arg) if arg else 4)
  with c.unlocked():
    c.loss.reg_decoder_weight = 0.0
    c.init_from.kind = "scratch"
  return c
