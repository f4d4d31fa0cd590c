"""Fixtures of the evaluation tests: golden tiny models in the original layout, and the embedded real clips."""
import os

import pytest

from cvvae_jax.data import embedded
from tests import helpers


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  root = tmp_path_factory.mktemp("golden")
  return {name: helpers.write_golden_folder(name, str(root / name))
          for name in ("cvvae_sd21_tiny", "sd21_image_vae_tiny", "sd3_image_vae_tiny")}


@pytest.fixture(scope="module")
def embedded_src():
  tfds_dir = embedded.prepare_embedded_dataset("~/.cache/cvvae_jax/data")
  return os.path.join(os.path.dirname(tfds_dir), "src")
