"""`config.init_from.kind="pretrained"`: a folder of the config's architecture loads, whatever its original-tiling
settings; another architecture is an error that shows both."""
from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest

import cvvae_jax
from configs import cvvae as cvvae_config
from cvvae_jax.train import build
from tests.helpers import random_params


def test_pretrained_init_ignores_tiling_settings_and_checks_the_architecture(tmp_path):
  config = cvvae_config.get_config("sd21,demo")
  vae = build.build_vae(config.model)
  params = random_params(vae, seed=3)
  folder = str(tmp_path / "tile72")
  cvvae_jax.save_pretrained(dataclasses.replace(vae, original_tile_size=72, original_round_frames=4), params, folder)
  config.init_from.kind, config.init_from.path = "pretrained", folder
  got = build.initial_vae_params(config, types.SimpleNamespace(vae=vae), {})
  jax.tree.map(np.testing.assert_array_equal, got, params)

  other = dataclasses.replace(vae, layers_per_block=vae.layers_per_block + 1)
  with pytest.raises(ValueError, match="holds .*layers_per_block.*but config.model describes"):
    build.initial_vae_params(config, types.SimpleNamespace(vae=other), {})
