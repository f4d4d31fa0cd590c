"""layers: the sub-pixel upsample convolution equals nearest upsampling followed by the convolution; the CPU forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax.models import conv_ops, cpu_conv, layers
from tests.helpers import conv_arrays, random_params

ZEROS, REPLICATE = layers.Pad.ZEROS, layers.Pad.REPLICATE


def _nearest_then_conv(x, kernel, bias, padding):
  """The definition: upsample H and W 2x by repetition, then the convolution (time, if any, is not upsampled)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
  return conv_ops.conv_apply(x, kernel, bias, padding=padding)


@pytest.mark.parametrize("space", [ZEROS, REPLICATE])
def test_upsample_conv_equals_nearest_then_conv_image(space):
  x, kernel, bias = conv_arrays((2, 5, 7, 4), (3, 3, 4, 6))
  padding = ((1, 1, space),) * 2
  got = conv_ops.upsample_conv_apply(x, kernel, bias, padding=padding, impl="subpixel")
  want = _nearest_then_conv(x, kernel, bias, padding)
  assert got.shape == (2, 10, 14, 6)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space,time", [(ZEROS, ZEROS), (ZEROS, REPLICATE), (REPLICATE, REPLICATE)])
def test_upsample_conv_equals_nearest_then_conv_video(space, time):
  x, kernel, bias = conv_arrays((1, 3, 4, 6, 4), (3, 3, 3, 4, 8))
  padding = ((1, 1, time),) + ((1, 1, space),) * 2
  got = conv_ops.upsample_conv_apply(x, kernel, bias, padding=padding, impl="subpixel")
  want = _nearest_then_conv(x, kernel, bias, padding)
  assert got.shape == (1, 3, 8, 12, 8)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_upsample_conv_gradients_match():
  x, kernel, bias = conv_arrays((1, 2, 4, 5, 4), (3, 3, 3, 4, 4), seed=1)
  padding = ((1, 1, REPLICATE),) + ((1, 1, ZEROS),) * 2
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, bias, padding=padding)))
  subpixel = lambda *a, **kw: conv_ops.upsample_conv_apply(*a, **kw, impl="subpixel")
  got = jax.grad(loss(subpixel), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(lambda x, k, b, padding: _nearest_then_conv(x, k, b, padding)), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("video,temporal,pad", [(False, False, ZEROS), (False, False, REPLICATE), (True, False, ZEROS),
                                                (True, True, REPLICATE), (True, True, ZEROS)])
def test_upsample_layer_matches_its_definition(video, temporal, pad):
  """`Upsample` (params `conv/kernel`, `conv/bias` as before) == repeat, conv, depth-to-time, drop frame 0."""
  style = layers.ConvStyle(video=video, space_pad=pad, up_time_pad=pad)
  shape = (1, 3, 4, 5, 4) if video else (2, 4, 5, 4)
  factor = 2 if temporal else 1
  x, kernel, bias = conv_arrays(shape, ((3,) if video else ()) + (3, 3, 4, 4 * factor), seed=2)
  module = layers.Upsample(style, temporal)
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"conv": {"kernel": kernel.shape, "bias": bias.shape}}
  got = module.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)
  want = _nearest_then_conv(x, kernel, bias, style.up_padding())
  if temporal:
    want = layers.depth_to_time(want, 2)[:, 1:]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_upsample_conv_bfloat16_rounds_once():
  x, kernel, bias = conv_arrays((1, 4, 4, 8), (3, 3, 8, 8), seed=3)
  padding = ((1, 1, ZEROS),) * 2
  got = conv_ops.upsample_conv_apply(x, kernel, bias, padding=padding, dtype=jnp.bfloat16,
                                     impl="subpixel")
  want = _nearest_then_conv(x, kernel, bias, padding)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=2e-2)


def test_upsample_conv_rejects_other_paddings():
  x, kernel, bias = conv_arrays((1, 4, 4, 2), (3, 3, 2, 2))
  with pytest.raises(ValueError, match="padding"):
    conv_ops.upsample_conv_apply(x, kernel, bias, padding=((0, 1, ZEROS), (1, 1, ZEROS)))
  with pytest.raises(ValueError, match="one mode"):
    conv_ops.upsample_conv_apply(x, kernel, bias, padding=((1, 1, ZEROS), (1, 1, REPLICATE)))


def _conv3d_reference(x, kernel, bias, strides, padding):
  """XLA's own 3D convolution on the input padded explicitly (replicate by `jnp.pad(mode="edge")`)."""
  for axis, (lo, hi, mode) in enumerate(padding, start=1):
    pads = [(0, 0)] * x.ndim
    pads[axis] = (lo, hi)
    x = jnp.pad(x, pads, mode="edge" if mode is REPLICATE else "constant")
  y = jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("time_pad,stride", [((2, 0, REPLICATE), 1), ((2, 0, ZEROS), 1), ((1, 1, ZEROS), 1),
                                             ((1, 1, REPLICATE), 1), ((0, 0, ZEROS), 1), ((2, 0, REPLICATE), 2),
                                             ((1, 1, ZEROS), 2)])
def test_conv3d_as_2d_matches_a_3d_convolution(frames, time_pad, stride):
  """The CPU default (`auto`): time padding by shifted outputs (stride 1) and by a padded copy (stride 2) == the
  padded 3D convolution."""
  if frames + time_pad[0] + time_pad[1] < 3:
    pytest.skip("kernel longer than the padded clip")
  x, kernel, bias = conv_arrays((2, frames, 5, 6, 3), (3, 3, 3, 3, 4), seed=frames)
  padding = (time_pad, (1, 1, REPLICATE), (0, 1, ZEROS))
  strides = (stride, 2, 1)
  got = conv_ops.conv_apply(x, kernel, bias, strides=strides, padding=padding)
  want = _conv3d_reference(x, kernel, bias, strides, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("time_pad,stride", [((2, 0, REPLICATE), 1), ((1, 1, ZEROS), 1), ((0, 0, ZEROS), 1),
                                             ((2, 0, REPLICATE), 2), ((1, 1, ZEROS), 2), ((2, 0, ZEROS), 2)])
def test_frame_loop_equals_the_tap_form(frames, time_pad, stride):
  """One output frame at a time (CPU's form) == one batched 2D convolution per tap, bit for bit, and gradients."""
  if frames + time_pad[0] + time_pad[1] < 3:
    pytest.skip("kernel longer than the padded clip")
  x, kernel, _ = conv_arrays((2, frames, 6, 5, 3), (3, 3, 3, 3, 4), seed=frames)
  static = ((stride, 2, 1), time_pad, ((1, 1), (0, 1)), None)
  taps = cpu_conv.conv3d_taps(x, kernel, *static)
  np.testing.assert_array_equal(cpu_conv.conv3d_frame_loop(x, kernel, *static), taps)
  np.testing.assert_array_equal(cpu_conv.conv3d_looped(x, kernel, *static), taps)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(taps.shape), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k, *static) * cotangent)
  for got, want in zip(jax.grad(loss(cpu_conv.conv3d_looped), (0, 1))(x, kernel),
                       jax.grad(loss(cpu_conv.conv3d_taps), (0, 1))(x, kernel)):
    np.testing.assert_array_equal(got, want)


def test_kernels_derived_per_call_are_made_when_their_layer_runs(monkeypatch):
  """Time-tap slices and upsampling phase kernels tied to their layer's input (the CPU forms, `conv_impl="auto"`
  on CPU): same output, less memory.

  Untied, XLA derives every layer's kernels at the program's start and keeps them all alive (measured on this
  64-128-channel decoder: 33 MB of temp untied, 21 MB tied)."""
  from cvvae_jax.models.vae3d import CVVAE

  vae = CVVAE(variant="sd21", block_out_channels=(64, 128, 128, 128), layers_per_block=1)
  params = random_params(vae, seed=0)
  z = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 4, 4, 4))
  decode = lambda: jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(params, z).compile()
  tied = decode()
  monkeypatch.setattr(cpu_conv, "tie_kernel", lambda x, kernel: kernel)
  untied = decode()
  assert tied.memory_analysis().temp_size_in_bytes < 0.75 * untied.memory_analysis().temp_size_in_bytes
  np.testing.assert_array_equal(tied(params, z), untied(params, z))
