"""ORIGINAL tiling follows the model's folder: a config.json with `tile_spatial_size`, `tile_overlap_ratio` and
`en_de_n_frames_a_time` other than the released 576 / 0.2222 / 16 gives the plan and latents the original code gives
that folder (the same as passing those sizes explicitly), our export records them, and explicit sizes still win."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

import cvvae_jax
from cvvae_jax.inference import api, plan
from cvvae_jax.inference.plan import Span, TilingConfig
from cvvae_jax.models import registry
from tests import helpers

ORIGINAL = TilingConfig(mode="original")
EXPLICIT_72 = TilingConfig(mode="original", tile_size=72, overlap=0.2222, encode_chunk_frames=5, decode_chunk_latents=2)
EXPLICIT_576 = TilingConfig(mode="original", tile_size=576, overlap=0.2222, encode_chunk_frames=17,
                            decode_chunk_latents=5)
VIDEO = (1, 9, 128, 128, 3)  # 3 latents, 16 x 16: 72-px tiles at 56-px strides are 2 x 2 equal tiles, 2 rounds


def _params(model, seed=0):
  """Kernels ~ N(0, 1/fan_in), other params 1 + 0.1 N or 0.1 N (numpy: no compilation)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in registry.param_shapes(model).items():
    if k.endswith("kernel"):
      out[k] = rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[:-1]))
    else:
      out[k] = (1.0 if k.endswith("scale") else 0.0) + 0.1 * rng.standard_normal(v.shape)
  return traverse_util.unflatten_dict({k: a.astype(np.float32) for k, a in out.items()}, sep="/")


def _folder(path, vae, params, **config):
  cvvae_jax.save_pretrained(vae, params, str(path))
  with open(path / "config.json") as f:
    cfg = json.load(f)
  cfg.update(config)
  with open(path / "config.json", "w") as f:
    json.dump(cfg, f)
  return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), layers_per_block=1)
  params = _params(vae)
  folder = _folder(tmp_path_factory.mktemp("orig") / "tile72", vae, params, tile_spatial_size=72,
                   en_de_n_frames_a_time=4)
  return vae, params, folder


def test_the_folder_s_tiling_gives_its_plan_and_explicit_sizes_win(tiny, tmp_path):
  vae, params, folder = tiny
  vae72, _ = cvvae_jax.load_pretrained(folder)
  assert (vae72.original_tile_size, vae72.original_tile_overlap, vae72.original_round_frames) == (72, 0.2222, 4)
  assert (vae.original_tile_size, vae.original_round_frames) == (576, 16)  # the released settings by default
  for encoder, shape in ((True, VIDEO), (False, (1, 3, 16, 16, 4))):
    following = api.plan_for(vae72, shape, encoder=encoder, tiling=ORIGINAL)
    assert following == api.plan_for(vae72, shape, encoder=encoder, tiling=EXPLICIT_72)
    assert following == api.plan_for(vae, shape, encoder=encoder, tiling=EXPLICIT_72)
    assert following.time == (Span(0, 2), Span(1, 2))
    assert following.space.rows == following.space.cols == (Span(0, 9), Span(7, 9))
    released = api.plan_for(vae, shape, encoder=encoder, tiling=ORIGINAL)
    assert released == api.plan_for(vae72, shape, encoder=encoder, tiling=EXPLICIT_576) != following
    assert released.time == (Span(0, 3),) and released.space.num_tiles == 1
  # Explicit sizes win one by one: tiles given, rounds still the folder's.
  mixed = api.plan_for(vae72, VIDEO, encoder=True, tiling=TilingConfig(mode="original", tile_size=576))
  assert mixed.space.num_tiles == 1 and mixed.time == (Span(0, 2), Span(1, 2))
  # TILED mode is ours and does not follow the folder.
  assert api.plan_for(vae72, VIDEO, encoder=True) == api.plan_for(vae, VIDEO, encoder=True)
  # The command line's defaults (None) follow the model in original mode; explicit flags win.
  assert TilingConfig.from_options("original", None, None, None) == ORIGINAL
  assert TilingConfig.from_options("original", 576, 17, 0.2222) == EXPLICIT_576
  assert TilingConfig.from_options("tiled", None, None, None) == TilingConfig()

  # Our exports record the settings: Flax (model.json) and the original layout (config.json).
  flax_dir = cvvae_jax.save_flax(vae72, params, str(tmp_path / "flax"))
  assert cvvae_jax.load_pretrained(flax_dir)[0] == vae72
  assert helpers.read_json(os.path.join(flax_dir, "model.json"))["fields"]["original_tile_size"] == 72
  torch_dir = cvvae_jax.save_pretrained(vae72, params, str(tmp_path / "torch"))
  cfg = helpers.read_json(os.path.join(torch_dir, "config.json"))
  assert (cfg["tile_spatial_size"], cfg["tile_overlap_ratio"], cfg["en_de_n_frames_a_time"]) == (72, 0.2222, 4)
  assert cvvae_jax.load_pretrained(torch_dir)[0] == vae72


def _edited(src, dst, **config):
  """A copy of folder `src` with `config` set in its config.json (the weights file shared by a hard link)."""
  os.makedirs(dst)
  os.link(os.path.join(src, "diffusion_pytorch_model.safetensors"), dst / "diffusion_pytorch_model.safetensors")
  cfg = {**helpers.read_json(os.path.join(src, "config.json")), **config}
  with open(dst / "config.json", "w") as f:
    json.dump(cfg, f)
  return str(dst)


def test_null_and_bad_tiling_keys(tiny, tmp_path):
  vae, params, folder = tiny
  none = _edited(folder, tmp_path / "none", tile_spatial_size=None, en_de_n_frames_a_time=None)
  vae_none, _ = cvvae_jax.load_pretrained(none)
  big = api.plan_for(vae_none, (1, 41, 720, 1280, 3), encoder=True, tiling=ORIGINAL)
  assert big.time == (Span(0, 11),) and big.space.num_tiles == 1  # the original: no rounds, no tiles
  for key, value, message in (
      ("en_de_n_frames_a_time", 6, "en_de_n_frames_a_time must be a positive multiple of time_n_compress=4 or null, "
       "got 6"),
      ("tile_spatial_size", 72.5, "tile_spatial_size must be a positive int of pixels or null, got 72.5"),
      ("tile_overlap_ratio", 0.7, r"tile_overlap_ratio must be a number in \[0, 0.5\) when tile_spatial_size is set, "
       "got 0.7")):
    bad = _edited(folder, tmp_path / key, **{key: value})
    with pytest.raises(ValueError, match=rf"{key}/config\.json: {message}"):
      cvvae_jax.load_pretrained(bad)
  with pytest.raises(ValueError, match=r"original round of 6 frames: expected a positive multiple of 4"):
    plan.OriginalSettings(round_frames=6).sizes()


@pytest.mark.slow  # compiles the tiny encoder for two shapes (~45 s on 2 busy cores)
def test_the_folder_s_tiling_gives_the_latents_of_its_explicit_sizes(tiny):
  """Measured on this tiny model: 72-px tiles and 5-frame rounds against one pass, relative error 0.94."""
  vae, params, folder = tiny
  vae72, params72 = cvvae_jax.load_pretrained(folder)
  x = helpers.astronaut_videos(b=1, t=9, h=128, w=128)[0]
  following = api.encode_streaming(vae72, params72, x, tiling=ORIGINAL)
  explicit = api.encode_streaming(vae72, params72, x, tiling=EXPLICIT_72)
  np.testing.assert_array_equal(following, explicit)
  released = api.encode_streaming(vae72, params72, x, tiling=EXPLICIT_576)
  assert released.shape == following.shape == (1, 3, 16, 16, 4)
  err = helpers.rel_err(following, released)
  print(f"72-px tiles + 5-frame rounds vs the 576 default: relative error {err:.3f}")
  assert err > 0.05
