"""Every weights file users have: bfloat16 / float16 safetensors, diffusers' variants (`...fp16.safetensors`),
sharded safetensors with an index, a parameter dtype on load, and clear errors naming the file for PyTorch pickles
(never unpickled) and truncated or corrupt files. The half-precision files we write are read by the original side
(`safetensors.torch`, diffusers)."""
import copy
import json
import os
import pickle

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import cvvae_jax
from cvvae_jax.models import registry
from cvvae_jax.weights import cli, convert, torch_format, weight_files

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

HALF = {"bf16": (ml_dtypes.bfloat16, torch.bfloat16), "fp16": (np.float16, torch.float16)}
TINY = {"cvvae": cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        "image_vae": cvvae_jax.ImageVAE(block_out_channels=(32, 32), layers_per_block=1, num_groups=8)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """An original-layout folder (float32) of a small image VAE."""
  vae = TINY["image_vae"]
  return cvvae_jax.save_pretrained(vae, _random_params(vae), str(tmp_path_factory.mktemp("weights") / "image_vae"))


def _random_params(model, seed=0):
  """Every parameter ~ 0.1 N(0, 1), float32 (numpy: no compilation)."""
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                                       for k, v in registry.param_shapes(model).items()}, sep="/")


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _copy_config(src, dst):
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())


@pytest.mark.parametrize("kind,half", [("image_vae", "bf16"), pytest.param("cvvae", "fp16", marks=pytest.mark.slow)])
def test_half_precision_save_is_what_torch_reads_and_loads_back(tmp_path, kind, half):
  """save_pretrained(dtype=...) writes tensors that safetensors.torch reads with the right dtype and exactly the
  rounding of the float32 params; loading the file gives those values (float32, or `param_dtype`); saving again in
  the same dtype gives bit-identical tensors (strict both ways)."""
  np_dtype, torch_dtype = HALF[half]
  vae = TINY[kind]
  params = _random_params(vae)
  out = cvvae_jax.save_pretrained(vae, params, str(tmp_path / "half"), dtype=half)
  ref32 = convert.flax_to_torch(params, vae)
  got = safetensors_torch.load_file(os.path.join(out, weight_files.WEIGHTS_NAME))
  assert set(got) == set(ref32)
  for key, value in got.items():
    assert value.dtype == torch_dtype, key
    assert torch.equal(value, torch.tensor(ref32[key]).to(torch_dtype)), key

  vae2, params2 = cvvae_jax.load_pretrained(out)
  assert vae2 == vae
  rounded = convert.torch_to_flax({k: v.astype(np_dtype) for k, v in ref32.items()}, vae)
  for path, value in _flat(params2).items():
    assert value.dtype == np.float32, path
    np.testing.assert_array_equal(value, _flat(rounded)[path].astype(np.float32), err_msg=path)
  _, params_half = cvvae_jax.load_pretrained(out, param_dtype=jnp.bfloat16 if half == "bf16" else "float16")
  assert {v.dtype for v in _flat(params_half).values()} == {np.dtype(np_dtype)}

  again = cvvae_jax.save_pretrained(vae2, params2, str(tmp_path / "again"), dtype=np_dtype)
  a, b = (load_file(os.path.join(d, weight_files.WEIGHTS_NAME)) for d in (out, again))
  assert set(a) == set(b) and all(a[k].dtype == np_dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def _diffusers_vae(seed=0):
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return ref


@pytest.mark.slow
def test_diffusers_variants_and_shards_load_and_diffusers_loads_ours(tmp_path):
  """Folders written by diffusers itself: an fp16 variant (`diffusion_pytorch_model.fp16.safetensors`), a sharded
  bf16 save (index json + shards); and diffusers' `from_pretrained` reads our bf16 save."""
  ref = _diffusers_vae()
  sd32 = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  copy.deepcopy(ref).to(torch.float16).save_pretrained(str(tmp_path / "fp16"), variant="fp16")
  assert sorted(os.listdir(tmp_path / "fp16")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
  vae, params = cvvae_jax.load_pretrained(str(tmp_path / "fp16"), variant="fp16")
  want = convert.torch_to_flax({k: v.astype(np.float16) for k, v in sd32.items()}, vae)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), params, want)
  with pytest.raises(FileNotFoundError, match=r"expected diffusion_pytorch_model\.safetensors or its shard index "
                     r"diffusion_pytorch_model\.safetensors\.index\.json in .*fp16; it holds the variant\(s\) "
                     r"\['fp16'\] \(pass variant=\.\.\.\)"):
    cvvae_jax.load_pretrained(str(tmp_path / "fp16"))
  with pytest.raises(FileNotFoundError, match=r"expected diffusion_pytorch_model\.bf16\.safetensors .* it holds the "
                     r"variant\(s\) \['fp16'\]"):
    cvvae_jax.load_pretrained(str(tmp_path / "fp16"), variant="bf16")

  copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
  files = sorted(os.listdir(tmp_path / "sharded"))
  assert weight_files.INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2, files
  _, sharded = cvvae_jax.load_pretrained(str(tmp_path / "sharded"))
  want = convert.torch_to_flax({k: v.astype(ml_dtypes.bfloat16) for k, v in sd32.items()}, vae)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), sharded, want)

  cvvae_jax.save_pretrained(vae, sharded, str(tmp_path / "ours_bf16"), dtype="bf16")
  back = type(ref).from_pretrained(str(tmp_path / "ours_bf16"), torch_dtype=torch.bfloat16)
  for key, value in back.state_dict().items():
    assert value.dtype == torch.bfloat16 and torch.equal(value, ref.state_dict()[key].to(torch.bfloat16)), key


def test_sharded_files_are_strict_and_name_the_file(folder, tmp_path):
  src = folder
  sd = load_file(os.path.join(src, weight_files.WEIGHTS_NAME))
  keys = sorted(sd)
  half = len(keys) // 2
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
            "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}

  def write(folder, shards, weight_map=None):
    _copy_config(src, folder)
    for name, names in shards.items():
      save_file({k: sd[k] for k in names}, os.path.join(folder, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map or {k: n for n, ks in shards.items() for k in ks}}
    with open(os.path.join(folder, weight_files.INDEX_NAME), "w") as f:
      json.dump(index, f)
    return str(folder)

  _, ref = cvvae_jax.load_pretrained(src)
  _, got = cvvae_jax.load_pretrained(write(tmp_path / "ok", shards))
  jax.tree_util.tree_map(np.testing.assert_array_equal, ref, got)

  bad = write(tmp_path / "missing_shard", shards)
  os.remove(os.path.join(bad, "diffusion_pytorch_model-00002-of-00002.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"index\.json lists the shard diffusion_pytorch_model-00002-of-00002"
                     r"\.safetensors, which is missing"):
    cvvae_jax.load_pretrained(bad)

  moved = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in keys}  # index says: all in shard 1
  with pytest.raises(convert.ConversionError, match=r"shard .*00001-of-00002\.safetensors does not match "
                     r".*index\.json: "
                     r"the index assigns .* to it, but it lacks them"):
    cvvae_jax.load_pretrained(write(tmp_path / "wrong_map", shards, moved))

  both = write(tmp_path / "both", shards)
  save_file(sd, os.path.join(both, weight_files.WEIGHTS_NAME))
  with pytest.raises(ValueError, match=r"holds both diffusion_pytorch_model\.safetensors and the shard index"):
    cvvae_jax.load_pretrained(both)
  cvvae_jax.save_pretrained(*cvvae_jax.load_pretrained(src), both)  # a save replaces the stale shards
  assert sorted(os.listdir(both)) == ["config.json", weight_files.WEIGHTS_NAME]

  bad = write(tmp_path / "bad_index", shards)
  with open(os.path.join(bad, weight_files.INDEX_NAME), "w") as f:
    f.write('{"weight_map": ')
  with pytest.raises(ValueError, match=r"index\.json is not valid JSON"):
    cvvae_jax.load_pretrained(bad)
  with open(os.path.join(bad, weight_files.INDEX_NAME), "w") as f:
    json.dump({"metadata": {}}, f)
  with pytest.raises(ValueError, match=r"expected a shard index \{\"weight_map\""):
    cvvae_jax.load_pretrained(bad)


class _Trap:
  """Unpickling this writes a marker file: proof that a loader ran code from the pickle."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickles_are_refused_without_unpickling(folder, tmp_path):
  marker = tmp_path / "unpickled"
  pickled = tmp_path / "bin"
  _copy_config(folder, pickled)
  with open(pickled / "diffusion_pytorch_model.bin", "wb") as f:
    pickle.dump({"encoder.conv_in.weight": _Trap(str(marker))}, f)
  with pytest.raises(ValueError, match=r"bin/diffusion_pytorch_model\.bin is a PyTorch pickle; pickles are never "
                     r"loaded here"):
    cvvae_jax.load_pretrained(str(pickled))
  # A torch.save zip named .safetensors is recognised too.
  torch.save({"encoder.conv_in.weight": torch.zeros(2)}, pickled / weight_files.WEIGHTS_NAME)
  with pytest.raises(ValueError, match=r"bin/diffusion_pytorch_model\.safetensors is a PyTorch pickle"):
    cvvae_jax.load_pretrained(str(pickled))
  assert not marker.exists()


def test_truncated_corrupt_and_non_float_files_name_the_file(folder, tmp_path):
  src = folder
  data = open(os.path.join(src, weight_files.WEIGHTS_NAME), "rb").read()
  for what, content in (("truncated", data[:-100]), ("cut_header", data[:20]), ("garbage", b"\x07" * 64),
                        ("empty", b"")):
    folder = tmp_path / what
    _copy_config(src, folder)
    (folder / weight_files.WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read .*{what}/diffusion_pytorch_model\.safetensors as safetensors "
                       r"\(truncated or corrupt\?\)"):
      cvvae_jax.load_pretrained(str(folder))
  sd = load_file(os.path.join(src, weight_files.WEIGHTS_NAME))
  sd["encoder.conv_in.bias"] = sd["encoder.conv_in.bias"].astype(np.float64)
  folder = tmp_path / "f64"
  _copy_config(src, folder)
  save_file(sd, str(folder / weight_files.WEIGHTS_NAME))
  with pytest.raises(convert.ConversionError, match=r"f64/diffusion_pytorch_model\.safetensors: expected float32, "
                     r"float16 or bfloat16 tensors, got encoder\.conv_in\.bias: float64"):
    cvvae_jax.load_pretrained(str(folder))
  # Strict in half precision as in float32: a missing tensor is named.
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(os.path.join(src, weight_files.WEIGHTS_NAME)).items()}
  del sd["decoder.conv_out.bias"]
  folder = tmp_path / "bf16_missing"
  _copy_config(src, folder)
  save_file(sd, str(folder / weight_files.WEIGHTS_NAME))
  with pytest.raises(convert.ConversionError, match=r"missing keys \(1\):\n  decoder\.conv_out\.bias"):
    cvvae_jax.load_pretrained(str(folder))


def test_bad_dtype_and_variant_arguments_are_errors(folder, tmp_path):
  vae, params = cvvae_jax.load_pretrained(folder)
  with pytest.raises(ValueError, match=r"dtype: expected one of \['bf16', 'bfloat16', 'float16', 'float32', 'fp16', "
                     r"'fp32'\], got 'int8'"):
    cvvae_jax.save_pretrained(vae, params, str(tmp_path / "x"), dtype="int8")
  with pytest.raises(ValueError, match=r"dtype: expected float32, float16 or bfloat16, got"):
    cvvae_jax.save_pretrained(vae, params, str(tmp_path / "x"), dtype=np.float64)
  with pytest.raises(ValueError, match=r"variant: expected a name such as 'fp16' or 'bf16' \(or None\), got 'a\.b'"):
    cvvae_jax.save_pretrained(vae, params, str(tmp_path / "x"), variant="a.b")
  with pytest.raises(ValueError, match=r"param_dtype: expected float32, bfloat16 or float16"):
    cvvae_jax.load_pretrained(folder, param_dtype="int8")
  out = cvvae_jax.save_pretrained(vae, params, str(tmp_path / "v"), dtype="fp16", variant="fp16")
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
  flax_dir = cvvae_jax.save_flax(vae, params, str(tmp_path / "flax"))
  with pytest.raises(ValueError, match=r"variant='fp16' picks a weights file of an original PyTorch folder; .*flax is "
                     "not one"):
    cvvae_jax.load_pretrained(flax_dir, variant="fp16")
  # param_dtype works for our export as well.
  _, restored = cvvae_jax.load_pretrained(flax_dir, param_dtype="bfloat16")
  flat, ref = _flat(restored), _flat(params)
  assert {v.dtype for v in flat.values()} == {np.dtype(ml_dtypes.bfloat16)}
  for k, v in flat.items():
    np.testing.assert_array_equal(v, ref[k].astype(ml_dtypes.bfloat16), err_msg=k)
  assert torch_format.is_torch_folder(out) and not torch_format.is_torch_folder(flax_dir)


def test_convert_command_line_writes_half_precision(folder, tmp_path, capsys):
  assert cli.main([folder, str(tmp_path / "bf16"), "--to", "torch", "--dtype", "bf16"]) == 0
  assert "ImageVAE" in capsys.readouterr().out
  sd = safetensors_torch.load_file(str(tmp_path / "bf16" / weight_files.WEIGHTS_NAME))
  ref = safetensors_torch.load_file(os.path.join(folder, weight_files.WEIGHTS_NAME))
  assert set(sd) == set(ref) and all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k].bfloat16())
                                     for k in sd)
  assert cli.main([folder, str(tmp_path / "f"), "--to", "flax", "--dtype", "fp16"]) == 2
  assert "error: --dtype is for --to torch" in capsys.readouterr().err

