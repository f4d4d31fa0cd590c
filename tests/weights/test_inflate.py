"""Inflation of image-VAE params into CV-VAE params: exactness on single frames, and strictness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cvvae_jax import CVVAE, ImageVAE
from cvvae_jax.weights.inflate import InflationError, inflate_params
from tests import helpers

CH = (32, 32, 32, 32)


def _image_vae(variant):
  if variant == "sd21":  # SD2.1 image VAE with the CV-VAE SD2.1's GroupNorm eps (1e-5; the released image VAE: 1e-6)
    return ImageVAE(block_out_channels=CH, layers_per_block=1, latent_channels=4, norm_eps=1e-5)
  # SD3 image VAE with CV-VAE SD3's spatial padding (replicate, symmetric downsampling)
  return ImageVAE(block_out_channels=CH, layers_per_block=1, latent_channels=16, use_quant_conv=False,
                  use_post_quant_conv=False, padding="replicate")


def _zeroed(params, paths):
  flat = traverse_util.flatten_dict(params, sep="/")
  for p in paths:
    flat[p] = jnp.zeros_like(flat[p])
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("variant", ["sd21", "sd3"])
def test_inflated_cvvae_reproduces_the_image_vae_on_single_frames(variant):
  img = _image_vae(variant)
  x = helpers.tiny_input((2, 16, 24, 3), seed=1)
  img_params = helpers.randomize_norms_and_biases(jax.jit(img.init)(jax.random.PRNGKey(0), x)["params"], seed=3)
  if variant == "sd21":
    # The two parts no inflation can carry (see inflate.py): the post-quant bias at the latent border and the
    # mid attention that the SD2.1 decoder's temporal attention replaces at initialization.
    img_params = _zeroed(img_params, ["post_quant_conv/bias", "decoder/mid/attn/spatial/proj_out/kernel",
                                      "decoder/mid/attn/spatial/proj_out/bias"])
  vid = CVVAE(variant=variant, block_out_channels=CH, layers_per_block=1, latent_channels=img.latent_channels)
  vid_params = inflate_params(img_params, img, vid)

  post_img = helpers.jit_method(img, "encode")(img_params, x)
  post_vid = helpers.jit_method(vid, "encode")(vid_params, x[:, None])
  assert helpers.rel_err(post_vid.mean[:, 0], post_img.mean) < 1e-5
  assert helpers.rel_err(post_vid.logvar[:, 0], post_img.logvar) < 1e-5
  z = post_img.mean
  out_img = helpers.jit_method(img, "decode")(img_params, z)
  out_vid = helpers.jit_method(vid, "decode")(vid_params, z[:, None])
  assert helpers.rel_err(out_vid[:, 0], out_img) < 1e-5


def test_inflated_encoder_treats_frames_independently_but_for_norm_statistics():
  img = _image_vae("sd21")
  vid = CVVAE(variant="sd21", block_out_channels=CH, layers_per_block=1, latent_channels=4)
  params = inflate_params(jax.jit(img.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"], img, vid)
  flat = traverse_util.flatten_dict(params, sep="/")
  k = flat["encoder/down_0/res_0/conv1/kernel"]
  assert k.shape == (3, 3, 3, 32, 32) and np.all(k[:2] == 0) and np.any(k[2] != 0)  # causal: last tap
  k = flat["decoder/up_0/res_0/conv1/kernel"]
  assert np.all(k[0] == 0) and np.all(k[2] == 0) and np.any(k[1] != 0)  # decoder: centre tap
  k = flat["decoder/up_0/upsample/conv/kernel"]
  assert k.shape[-1] == 64 and np.array_equal(k[..., :32], k[..., 32:])  # time upsampling: both frames
  assert np.all(flat["decoder/mid/attn/temporal/proj_out/kernel"] == 0)
  assert np.all(flat["decoder/mid/attn/temporal/proj_out/bias"] == 0)


def test_inflation_is_strict():
  img = ImageVAE(block_out_channels=CH, layers_per_block=1, latent_channels=4)
  params = jax.jit(img.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  with pytest.raises(InflationError, match=r"latent_channels: image VAE 4 vs CV-VAE 16"):
    inflate_params(params, img, CVVAE(variant="sd3", block_out_channels=CH, layers_per_block=1, latent_channels=16))
  vid = CVVAE(variant="sd21", block_out_channels=CH, layers_per_block=1, latent_channels=4)
  broken = dict(params)
  broken["extra"] = {"bias": jnp.zeros(3)}
  broken = traverse_util.flatten_dict(broken, sep="/")
  del broken["encoder/conv_in/kernel"]
  with pytest.raises(InflationError) as info:
    inflate_params(traverse_util.unflatten_dict(broken, sep="/"), img, vid)
  assert "image VAE params have no encoder/conv_in/kernel" in str(info.value)
  assert "not used by the CV-VAE: ['extra/bias']" in str(info.value)
