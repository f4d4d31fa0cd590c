"""Parity with the original PyTorch models and strict PyTorch <-> Flax conversion."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import cvvae_jax
from cvvae_jax.weights import cli, convert, torch_format
from tests import helpers

GOLDEN_TOL = 2e-5  # fixture README: float32 runs within 10x the torch fp32-vs-fp64 noise


@pytest.fixture(scope="module")
def golden_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("golden")
  return {name: helpers.write_golden_folder(name, str(root / name)) for name in helpers.GOLDEN_NAMES}


def test_regenerated_golden_weights_match_checksums(golden_dirs):
  sums = helpers.read_json(f"{helpers.GOLDEN}/weights_checksums.json")
  for name, path in golden_dirs.items():
    sd = load_file(os.path.join(path, torch_format.WEIGHTS_NAME))
    assert len(sd) == sums[name]["tensors"]
    total = sum(float(np.sum(v, dtype=np.float64)) for v in sd.values())
    assert total == pytest.approx(sums[name]["sum_f64"], rel=1e-9)


@pytest.mark.parametrize("name", helpers.GOLDEN_NAMES + tuple(
    pytest.param(n + "+frame_loop", id=n + "-frame_loop") for n in helpers.GOLDEN_NAMES if n.startswith("cvvae"))
    + tuple(pytest.param(n + "+xla", id=n + "-xla", marks=[pytest.mark.slow] if n.startswith("cvvae") else [])
            for n in helpers.GOLDEN_NAMES))
def test_golden_parity_with_the_original_pytorch_models(golden_dirs, name):
  """"+frame_loop": every 3D convolution one output frame at a time (`conv_impl="cpu_frames"`; the golden frames,
  32x48, are below the size where the CPU default takes that form by itself); "+xla": XLA's 3D convolutions and the
  upsampled copy (the TPU/GPU program)."""
  name, _, impl = name.partition("+")
  impls = {"": {}, "frame_loop": dict(conv_impl="cpu_frames"), "xla": dict(conv_impl="xla", upsample_impl="xla")}
  vae, params = cvvae_jax.load_pretrained(golden_dirs[name], **impls[impl])
  golden = np.load(f"{helpers.GOLDEN}/{name}.golden.npz")
  encode, decode = helpers.jit_method(vae, "encode"), helpers.jit_method(vae, "decode")
  inputs = ("video", "image") if isinstance(vae, cvvae_jax.CVVAE) else ("image",)
  for kind in inputs:
    post = encode(params, helpers.to_channels_last(golden[f"x_{kind}"]))
    dec = decode(params, helpers.to_channels_last(golden[f"z_{kind}"]))
    for got, key in ((post.mean, "mean"), (post.logvar, "logvar"), (dec, "dec")):
      err = helpers.rel_err(got, helpers.to_channels_last(golden[f"{key}_{kind}"]))
      assert err <= GOLDEN_TOL, f"{name} {key}_{kind}: rel err {err:.2e}"


@pytest.mark.parametrize("name", helpers.FULL_NAMES)
def test_full_size_export_layout_matches_the_released_weights(name):
  """Every key, shape and dtype of the released weights, all of them and nothing more (no allocation)."""
  ref = helpers.read_tsv(f"{helpers.REFERENCE}/{name}.params.tsv")
  model = torch_format.model_from_config(helpers.read_json(f"{helpers.REFERENCE}/{name}.config.json"))
  layout = convert.torch_layout(model)
  assert set(layout) == set(ref)
  assert {k: v[1] for k, v in layout.items()} == {k: v[0] for k, v in ref.items()}
  assert {dtype for _, dtype in ref.values()} == {"float32"}


@pytest.mark.parametrize("name", helpers.GOLDEN_NAMES)
def test_torch_folder_round_trip_is_bit_identical(golden_dirs, tmp_path, name):
  vae, params = cvvae_jax.load_pretrained(golden_dirs[name])
  out = cvvae_jax.save_pretrained(vae, params, str(tmp_path / "export"))
  original = load_file(os.path.join(golden_dirs[name], torch_format.WEIGHTS_NAME))
  exported = load_file(os.path.join(out, torch_format.WEIGHTS_NAME))
  assert set(exported) == set(original) == set(helpers.read_tsv(f"{helpers.GOLDEN}/{name}.params.tsv"))
  for key, value in original.items():
    assert exported[key].dtype == value.dtype == np.float32 and exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # The exported config.json describes the same model as the original one.
  with open(os.path.join(out, torch_format.CONFIG_NAME)) as f:
    assert torch_format.model_from_config(json.load(f)) == vae
  # ... and is the original config itself, up to `sample_size` (diffusers metadata that no weight depends on).
  config_ref = helpers.read_json(f"{helpers.GOLDEN}/{name}.config.json")
  with open(os.path.join(out, torch_format.CONFIG_NAME)) as f:
    config_out = json.load(f)
  config_out.pop("sample_size", None), config_ref.pop("sample_size", None)
  assert config_out == config_ref


def test_flax_export_to_torch_and_back_gives_identical_outputs(golden_dirs, tmp_path):
  vae, params = cvvae_jax.load_pretrained(golden_dirs["cvvae_sd21_tiny"])
  cvvae_jax.save_flax(vae, params, str(tmp_path / "flax"))
  vae2, params2 = cvvae_jax.load_pretrained(str(tmp_path / "flax"))
  assert vae2 == vae
  cvvae_jax.save_pretrained(vae2, params2, str(tmp_path / "torch"))
  vae3, params3 = cvvae_jax.load_pretrained(str(tmp_path / "torch"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params3)
  x = helpers.tiny_input((1, 5, 16, 16, 3))
  encode = helpers.jit_method(vae, "encode")
  np.testing.assert_array_equal(encode(params, x).mean, encode(params3, x).mean)


def test_convert_command_line(golden_dirs, tmp_path, capsys):
  cli.main([golden_dirs["sd3_image_vae_tiny"], str(tmp_path / "flax"), "--to", "flax"])
  cli.main([str(tmp_path / "flax"), str(tmp_path / "torch"), "--to", "torch"])
  assert "ImageVAE" in capsys.readouterr().out
  a = load_file(os.path.join(golden_dirs["sd3_image_vae_tiny"], torch_format.WEIGHTS_NAME))
  b = load_file(str(tmp_path / "torch" / torch_format.WEIGHTS_NAME))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _rewrite(src_dir, dst_dir, edit):
  sd = load_file(os.path.join(src_dir, torch_format.WEIGHTS_NAME))
  edit(sd)
  os.makedirs(dst_dir, exist_ok=True)
  save_file(sd, os.path.join(dst_dir, torch_format.WEIGHTS_NAME))
  with open(os.path.join(src_dir, torch_format.CONFIG_NAME)) as f, open(os.path.join(dst_dir, torch_format.CONFIG_NAME), "w") as g:
    g.write(f.read())
  return str(dst_dir)


def test_missing_unexpected_and_misshaped_tensors_are_named(golden_dirs, tmp_path):
  def edit(sd):
    del sd["decoder.up.3.upsample.conv.weight"]
    sd["encoder.extra.weight"] = np.zeros((2,), np.float32)
    sd["encoder.conv_in.bias"] = np.zeros((7,), np.float32)
  bad = _rewrite(golden_dirs["cvvae_sd21_tiny"], tmp_path / "bad", edit)
  with pytest.raises(convert.ConversionError) as info:
    cvvae_jax.load_pretrained(bad)
  msg = str(info.value)
  assert "missing keys (1):\n  decoder.up.3.upsample.conv.weight (flax decoder/up_0/upsample/conv/kernel)" in msg
  assert "unexpected keys" in msg and "encoder.extra.weight" in msg
  assert "encoder.conv_in.bias: got (7,), expected (32,)" in msg


def test_legacy_attention_names_load_and_duplicates_are_errors(golden_dirs, tmp_path):
  src = golden_dirs["sd21_image_vae_tiny"]
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def to_legacy(sd):
    for key in [k for k in sd if ".attentions.0." in k]:
      for new, old in renames.items():
        if f".attentions.0.{new}." in key:
          sd[key.replace(f".{new}.", f".{old}.")] = sd.pop(key)
  _, params = cvvae_jax.load_pretrained(src)
  _, legacy = cvvae_jax.load_pretrained(_rewrite(src, tmp_path / "legacy", to_legacy))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, legacy)

  def duplicate(sd):
    sd["encoder.mid_block.attentions.0.query.weight"] = sd["encoder.mid_block.attentions.0.to_q.weight"]
  with pytest.raises(convert.ConversionError, match=r"keys mapped twice \(1\)"):
    cvvae_jax.load_pretrained(_rewrite(src, tmp_path / "dup", duplicate))


def test_bad_files_are_clear_errors(golden_dirs, tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model path"):
    cvvae_jax.load_pretrained(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="is not a model: expected an original PyTorch folder"):
    cvvae_jax.load_pretrained(str(empty))
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / torch_format.WEIGHTS_NAME).write_bytes(b"\x00garbage")
  (corrupt / torch_format.CONFIG_NAME).write_text(json.dumps(helpers.read_json(f"{helpers.GOLDEN}/cvvae_sd3_tiny.config.json")))
  with pytest.raises(ValueError, match="cannot read .* as safetensors"):
    cvvae_jax.load_pretrained(str(corrupt))
  (corrupt / torch_format.CONFIG_NAME).write_text(json.dumps({"_class_name": "UNet2DModel"}))
  with pytest.raises(ValueError, match="unknown _class_name 'UNet2DModel'"):
    cvvae_jax.load_pretrained(str(corrupt))
  (corrupt / torch_format.CONFIG_NAME).write_text(json.dumps({"_class_name": "CVVAEModel", "use_3d_conv": False}))
  with pytest.raises(ValueError, match="unsupported use_3d_conv=False"):
    cvvae_jax.load_pretrained(str(corrupt))
  (corrupt / torch_format.CONFIG_NAME).write_text("{not json")
  with pytest.raises(ValueError, match="is not valid JSON"):
    cvvae_jax.load_pretrained(str(corrupt))


def test_export_rejects_params_of_another_model(golden_dirs, tmp_path):
  vae, params = cvvae_jax.load_pretrained(golden_dirs["cvvae_sd21_tiny"])
  params = dict(params)
  params["extra"] = {"kernel": jnp.zeros((2,))}
  with pytest.raises(convert.ConversionError, match=r"parameters this model does not have \(1\):\n  extra/kernel"):
    cvvae_jax.save_pretrained(vae, params, str(tmp_path / "x"))


@pytest.mark.parametrize("config", [
    dict(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, shape=(1, 3, 32, 48)),
    dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shape=(2, 3, 24, 40)),
])
def test_image_vae_matches_diffusers_autoencoderkl(config):
  """Our SD image VAE against diffusers' PyTorch AutoencoderKL with the same (random) weights."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = dict(config)
  shape = config.pop("shape")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, **config).eval()
  with torch.no_grad():
    for p in ref.parameters():  # non-trivial norms and biases
      p.add_(0.05 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  vae = torch_format.model_from_config({"_class_name": "AutoencoderKL", **{k: v for k, v in ref.config.items()}})
  params = convert.torch_to_flax(sd, vae)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x)).latent_dist
    z = dist.mean
    dec = ref.decode(z).sample.numpy()
  post = helpers.jit_method(vae, "encode")(params, np.moveaxis(x, 1, -1))
  assert helpers.rel_err(post.mean, np.moveaxis(dist.mean.numpy(), 1, -1)) < 2e-5
  assert helpers.rel_err(post.logvar, np.moveaxis(dist.logvar.numpy(), 1, -1)) < 2e-5
  got = helpers.jit_method(vae, "decode")(params, np.moveaxis(z.numpy(), 1, -1))
  assert helpers.rel_err(got, np.moveaxis(dec, 1, -1)) < 2e-5
