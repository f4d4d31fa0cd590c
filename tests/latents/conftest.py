"""Fixtures of the latent tests: a tiny CV-VAE in the original layout, the embedded clips, the encode command."""
import os
import subprocess
import sys

import pytest

from cvvae_jax.data import embedded
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The clips every test encodes: the embedded training split's 5 videos (60 frames), 2 clips each, 9 frames at
# stride 2, 32x48.
CLIP_FLAGS = ["--data=embedded", "--split=train", "--frames=9", "--stride=2", "--resolution=32x48",
              "--clips_per_video=2"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  embedded.prepare_embedded_dataset("~/.cache/cvvae_jax/data")
  return helpers.write_golden_folder("cvvae_sd21_tiny", str(tmp_path_factory.mktemp("models") / "cvvae_sd21_tiny"))


def command(model, out, *flags):
  """`python -m cvvae_jax.encode_latents` with the test clips into `out`."""
  return [sys.executable, "-m", "cvvae_jax.encode_latents", f"--model={model}", f"--out={out}", *CLIP_FLAGS, *flags]


def run_command(cmd, devices=2, timeout=600):
  env = {**os.environ, "PYTHONPATH": REPO,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done
