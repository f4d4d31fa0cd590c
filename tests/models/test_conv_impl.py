"""conv_impl / upsample_impl: every algorithm gives the same convolutions (forward and gradients), `auto` is a pure
function of the platform name, attention through `jax.nn.dot_product_attention` is the earlier formulation, and the
choice is a run-time field (not in specs; set by load_pretrained, the config, the CLIs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cvvae_jax
from configs import cvvae as cvvae_config
from cvvae_jax import cli
from cvvae_jax.eval import cli as eval_cli
from cvvae_jax.eval import config as eval_config
from cvvae_jax.inference import reconstruct
from cvvae_jax.models import conv_ops, cpu_conv, layers, registry
from cvvae_jax.models.conv_impl import CONV_IMPLS, UPSAMPLE_IMPLS, ConvImpl, UpsampleImpl, resolve_conv_impl
from cvvae_jax.models.conv_impl import resolve_upsample_impl as resolve_upsample
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.train import build
from tests.helpers import conv_arrays, random_params

ZEROS, REPLICATE = layers.Pad.ZEROS, layers.Pad.REPLICATE
EXPLICIT = ("xla", "cpu", "cpu_taps", "cpu_frames")
# f32 on CPU: the forms differ only in summation order.
TOL = dict(atol=2e-5, rtol=2e-5)


def _value_and_grads(fn, x, kernel, seed=1):
  """fn(x, kernel), and the gradients of <fn(x, kernel), cotangent> w.r.t. x and kernel (jitted)."""
  y = jax.jit(fn)(x, kernel)
  cot = jnp.asarray(np.random.default_rng(seed).standard_normal(y.shape), jnp.float32)
  grads = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) * cot), (0, 1)))(x, kernel)
  return y, grads


def _assert_same(got, want, tol=TOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol)


@pytest.mark.parametrize("platform,conv,up", [("tpu", "xla", "xla"), ("gpu", "xla", "xla"), ("cuda", "xla", "xla"),
                                              ("cpu", "cpu", "subpixel"), ("CPU", "cpu", "subpixel")])
def test_auto_is_a_pure_function_of_the_platform(platform, conv, up):
  assert resolve_conv_impl("auto", platform) is ConvImpl(conv)
  assert resolve_upsample("auto", platform) is UpsampleImpl(up)
  for name in EXPLICIT:  # explicit choices are kept on every platform
    assert resolve_conv_impl(name, platform) is ConvImpl(name)
  assert resolve_upsample("subpixel", platform) is UpsampleImpl.SUBPIXEL
  assert resolve_conv_impl(ConvImpl.CPU_TAPS, platform) is ConvImpl.CPU_TAPS


def test_unknown_names_are_errors_naming_the_choices():
  with pytest.raises(ValueError, match=r"conv_impl: expected one of .*'cpu_frames'.*got 'cudnn'"):
    resolve_conv_impl("cudnn", "gpu")
  with pytest.raises(ValueError, match=r"upsample_impl: expected one of .*'subpixel'"):
    resolve_upsample("phase", "cpu")
  with pytest.raises(ValueError, match="conv_impl"):
    registry.with_conv_impl(CVVAE(), "fast")
  assert cli.CONV_IMPL_NAMES == CONV_IMPLS and UPSAMPLE_IMPLS == ("auto", "xla", "subpixel")


# Shapes that exercise each form: several time taps, time/space strides (the padded tap form), causal replicate,
# symmetric zeros, a time kernel longer than the clip without padding, frames at the frame-loop threshold (64x64:
# `cpu` loops there), 1-tap and 2D kernels (one conv_general_dilated for every impl).
R2, Z11, Z01 = (2, 0, REPLICATE), (1, 1, ZEROS), (0, 1, ZEROS)
CASES = {
    "causal_replicate": ((2, 5, 6, 5, 3), (3, 3, 3, 3, 4), (1, 1, 1), (R2, Z11, Z11)),
    "symmetric_zeros": ((1, 4, 5, 6, 2), (3, 3, 3, 2, 2), (1, 1, 1), ((1, 1, ZEROS), (1, 1, REPLICATE), (0, 1, ZEROS))),
    "stride_2": ((1, 5, 6, 6, 2), (3, 3, 3, 2, 3), (2, 2, 2), ((2, 0, REPLICATE), (0, 1, ZEROS), (0, 1, ZEROS))),
    "stride_2_zeros": ((1, 4, 5, 6, 2), (3, 3, 3, 2, 3), (2, 1, 2), ((1, 1, ZEROS), (1, 1, ZEROS), (1, 1, ZEROS))),
    "unpadded_time": ((1, 4, 5, 5, 2), (3, 3, 3, 2, 2), (1, 1, 1), ((0, 0, ZEROS), (1, 1, ZEROS), (1, 1, ZEROS))),
    "one_frame_causal": ((1, 1, 5, 5, 2), (3, 3, 3, 2, 2), (1, 1, 1), (R2, Z11, Z11)),
    "frame_loop_size": ((1, 3, 64, 64, 2), (3, 3, 3, 2, 2), (1, 1, 1), (R2, Z11, Z11)),
    "frame_loop_stride": ((1, 5, 64, 64, 1), (3, 3, 3, 1, 2), (2, 2, 2), (Z11, Z01, Z01)),
    "one_tap": ((1, 3, 5, 5, 3), (1, 1, 1, 3, 4), (1, 1, 1), None),
    "image_2d": ((2, 6, 5, 3), (3, 3, 3, 4), (2, 1), ((1, 1, REPLICATE), (1, 1, ZEROS))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_conv_impl_agrees_forward_and_gradients(case):
  x_shape, k_shape, strides, padding = CASES[case]
  x, kernel, bias = conv_arrays(x_shape, k_shape, seed=len(case))
  conv = lambda impl: lambda x, k: conv_ops.conv_apply(x, k, bias, strides=strides, padding=padding, impl=impl)
  want = _value_and_grads(conv("xla"), x, kernel)
  assert float(jnp.max(jnp.abs(want[1][0]))) > 0 and float(jnp.max(jnp.abs(want[1][1]))) > 0
  # "cpu" is one of the two by frame size (and "auto" is "cpu" here): tried where it is the frame loop.
  for impl in ("cpu_taps", "cpu_frames") + (("cpu",) if x.shape[-2] >= 64 else ()):
    got = _value_and_grads(conv(impl), x, kernel)
    assert got[0].shape == want[0].shape
    _assert_same(got, want)


def test_cpu_forms_are_bit_identical_to_each_other_and_xla_is_one_3d_convolution():
  x_shape, k_shape, strides, padding = CASES["frame_loop_size"]
  x, kernel, bias = conv_arrays(x_shape, k_shape)
  conv = lambda impl: lambda x, k: conv_ops.conv_apply(x, k, bias, strides=strides, padding=padding, impl=impl)
  taps = _value_and_grads(conv("cpu_taps"), x, kernel)
  for impl in ("cpu", "cpu_frames"):
    for got, want in zip(jax.tree.leaves(_value_and_grads(conv(impl), x, kernel)), jax.tree.leaves(taps)):
      np.testing.assert_array_equal(got, want)
  hlo = lambda impl, x: jax.jit(conv(impl)).lower(x, kernel).as_text()
  assert "while" in hlo("cpu", x) and "while" in hlo("cpu_frames", x[:, :, :8, :8])  # the frame loop
  assert "while" not in hlo("cpu", x[:, :, :63]) and "while" not in hlo("cpu_taps", x)  # below the threshold: taps
  xla = hlo("xla", x)
  assert "while" not in xla and xla.count("stablehlo.convolution") == 1 and "[b, 0, 1, 2, f]" in xla


@pytest.mark.parametrize("video,temporal,pad", [(False, False, ZEROS), (False, False, REPLICATE), (True, True, ZEROS),
                                                (True, False, REPLICATE)])
@pytest.mark.parametrize("conv_impl", ["xla", "cpu"])
def test_upsample_impls_agree_forward_and_gradients(video, temporal, pad, conv_impl):
  style = layers.ConvStyle(video=video, space_pad=pad, up_time_pad=pad)
  shape = (1, 3, 4, 5, 4) if video else (2, 4, 5, 4)
  x, kernel, bias = conv_arrays(shape, ((3,) if video else ()) + (3, 3, 4, 4 * (2 if temporal else 1)), seed=2)
  up = lambda impl: lambda x, k: layers.Upsample(style, temporal, conv_impl=conv_impl, upsample_impl=impl).apply(
      {"params": {"conv": {"kernel": k, "bias": bias}}}, x)
  want = _value_and_grads(up("xla"), x, kernel)
  for impl in ("subpixel", "auto"):
    _assert_same(_value_and_grads(up(impl), x, kernel), want)


def _attention_before(q, k, v):
  """The formulation `layers.attention` replaced: einsums, logits and softmax in float32."""
  logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  return jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, dict(atol=1e-5, rtol=1e-5)),
                                       (jnp.bfloat16, dict(atol=2e-2, rtol=2e-2))])
def test_attention_matches_the_previous_formulation(dtype, tol):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(2 * rng.standard_normal((3, 50, 16)), dtype) for _ in range(3))
  got, want = jax.jit(layers.attention)(q, k, v), jax.jit(_attention_before)(q, k, v)
  assert got.dtype == want.dtype == dtype and got.shape == (3, 50, 16)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
  cot = jnp.asarray(rng.standard_normal(got.shape), dtype)
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum((f(q, k, v) * cot).astype(jnp.float32)), (0, 1, 2)))(
      q, k, v)
  for g, w in zip(grad(layers.attention), grad(_attention_before)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)


@pytest.mark.slow
def test_a_tiny_cvvae_with_xla_convolutions_equals_the_cpu_default():
  """Encode, decode and the gradient of a reconstruction loss (64x64 frames: the encoder's first level loops)."""
  cpu = CVVAE(variant="sd21", block_out_channels=(8, 16), layers_per_block=1, num_groups=4, temporal_compression=2)
  xla = cpu.clone(conv_impl="xla", upsample_impl="xla")
  params = random_params(cpu, seed=0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 5, 64, 64, 3)), jnp.float32)

  def run(model):
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x)[0] - x))
    post = jax.jit(lambda p: model.apply({"params": p}, x, method="encode"))(params)
    return post.mean, post.logvar, jax.jit(jax.grad(loss))(params)

  got, want = run(xla), run(cpu)
  assert "while" in jax.jit(lambda p: cpu.apply({"params": p}, x, method="encode").mean).lower(params).as_text()
  _assert_same(got, want, dict(atol=1e-4, rtol=1e-4))


def test_conv_impl_is_a_run_time_field_of_specs_and_load_pretrained(tmp_path):
  model = CVVAE(variant="sd3", block_out_channels=(8, 16), layers_per_block=1, num_groups=4, latent_channels=4,
                temporal_compression=2, conv_impl="cpu_taps", upsample_impl="xla")
  spec = registry.model_spec(model)
  assert "conv_impl" not in spec["fields"] and "upsample_impl" not in spec["fields"]
  assert registry.model_from_spec(spec).conv_impl == "auto"  # old specs, which never had the field: auto
  assert registry.model_from_spec(spec, conv_impl="xla").conv_impl == "xla"
  params = random_params(model, seed=0)
  cvvae_jax.save_flax(model, params, str(tmp_path / "export"))
  loaded, loaded_params = cvvae_jax.load_pretrained(str(tmp_path / "export"), conv_impl="xla")
  assert (loaded.conv_impl, loaded.upsample_impl) == ("xla", "auto")
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16, 3)), jnp.float32)
  encode = lambda m, p: m.apply({"params": p}, x, method="encode").mean
  np.testing.assert_allclose(encode(loaded, loaded_params), encode(model, params), **TOL)


def test_kernels_are_tied_only_by_the_cpu_forms():
  """The CPU forms tie derived kernels to the layer input (a select on a value of x); xla leaves kernels alone."""
  x, kernel, bias = conv_arrays(*CASES["causal_replicate"][:2])
  padding = CASES["causal_replicate"][3]
  hlo = lambda impl: jax.jit(lambda x, k: conv_ops.conv_apply(x, k, bias, padding=padding, impl=impl)).lower(
      x, kernel).as_text()
  assert "stablehlo.select" in hlo("cpu_taps") and "stablehlo.select" not in hlo("xla")
  np.testing.assert_array_equal(cpu_conv.tie_kernel(x, kernel), kernel)


def test_the_choice_comes_from_the_config_and_the_command_lines(tmp_path):
  """`config.train.conv_impl` / `upsample_impl` reach every trained and frozen model; the CLIs take `--conv_impl`;
  the evaluation config rejects unknown names."""
  c = cvvae_config.get_config("sd21,demo")
  assert (c.train.conv_impl, c.train.upsample_impl) == ("auto", "auto")
  with c.unlocked():
    c.train.conv_impl, c.train.upsample_impl = "xla", "subpixel"
    c.loss.reg_decoder_weight = 0.0
  image_vae = cvvae_jax.ImageVAE(block_out_channels=(32, 32), layers_per_block=1)
  models = build.build_models(c, image_vae)
  assert (models.vae.conv_impl, models.vae.upsample_impl, models.disc.conv_impl) == ("xla", "subpixel", "xla")
  assert (models.image_vae.conv_impl, models.image_vae.upsample_impl) == ("xla", "subpixel")
  args = reconstruct.parser().parse_args(["--model", "m", "--input", "i.mp4", "--out", "o.mp4", "--conv_impl", "xla"])
  assert args.conv_impl == "xla"
  assert eval_cli.parser().parse_args(["--model", "m", "--data", "d", "--out", "o"]).conv_impl == "auto"
  with pytest.raises(SystemExit):
    reconstruct.parser().parse_args(["--model", "m", "--input", "i", "--out", "o", "--conv_impl", "cudnn"])
  with pytest.raises(eval_config.EvaluationError, match="conv_impl: expected one of"):
    eval_config.EvalConfig(model="m", data="d", out="o", conv_impl="cudnn")


def _explicit_3d(strides, padding):
  """The 3D convolution with its padding made explicit (edge or zeros per axis), then one VALID convolution."""
  def conv(x, k):
    for axis, (lo, hi, mode) in enumerate(padding, start=1):
      pad = [(0, 0)] * x.ndim
      pad[axis] = (lo, hi)
      x = jnp.pad(x, pad, mode="edge" if mode is REPLICATE else "constant")
    return jax.lax.conv_general_dilated(x, k, strides, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
  return conv


@pytest.mark.parametrize("time_pad,stride", [(R2, 1), ((2, 0, ZEROS), 1), ((1, 1, REPLICATE), 1), (Z11, 1), (R2, 2),
                                             ((1, 1, ZEROS), 2)])
@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_one_frame_inputs_are_one_2d_convolution(time_pad, stride, impl):
  """A one-frame input (the image stream through the CV-VAE) is convolved in 2D with the taps that read its frame
  merged (all of them with replicate padding, the one over it with zeros): the explicitly padded 3D convolution's
  result and gradients, from one 2D convolution (no padded copy, 1/3 of the multiply-adds when causal)."""
  x, kernel, bias = conv_arrays((2, 1, 6, 5, 3), (3, 3, 3, 3, 4), seed=7)
  strides, padding = (stride, 1, 1), (time_pad, (1, 1, REPLICATE), Z11)
  fn = lambda x, k: conv_ops.conv_apply(x, k, bias, strides=strides, padding=padding, impl=impl)
  want = _value_and_grads(lambda x, k: _explicit_3d(strides, padding)(x, k) + bias, x, kernel)
  got = _value_and_grads(fn, x, kernel)
  assert got[0].shape == want[0].shape == (2, 1, 6, 5, 4)
  _assert_same(got, want)
  hlo = jax.jit(fn).lower(x, kernel).as_text()
  assert hlo.count("stablehlo.convolution") == 1 and "[b, 0, 1, f]" in hlo  # one 2D convolution
  assert conv_ops._one_frame_taps(3, (0, 0, ZEROS), 1) == ()  # a 3-tap kernel does not fit one unpadded frame
