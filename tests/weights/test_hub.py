"""Loading by Hugging Face Hub id from a hub cache on disk, offline (no network): the cache is built here in the
layout `huggingface_hub` uses (`models--OWNER--NAME/{refs/<ref>, snapshots/<commit>/..., blobs/<hash>}`, snapshot
files symlinked to blobs), and `huggingface_hub.snapshot_download` resolves ids, revisions and subfolders in it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

import cvvae_jax
from cvvae_jax.models import registry
from cvvae_jax.weights import hub, weight_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO_ID = "AILab-CVC/CV-VAE"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}
TINY = {"vae3d": cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        "vae3d_sd3": cvvae_jax.CVVAE(variant="sd3", block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                     latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)}


def _random_params(model, seed):
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                                       for k, v in registry.param_shapes(model).items()}, sep="/")


def _add_to_cache(cache, repo_id, ref, commit, folder):
  """Puts the files of `folder` into the hub cache as the snapshot `commit` of `repo_id`, named by `ref`."""
  storage = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
  os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
  with open(os.path.join(storage, "refs", ref), "w") as f:
    f.write(commit)
  for root, _, files in os.walk(folder):
    for name in files:
      src = os.path.join(root, name)
      rel = os.path.relpath(src, folder)
      data = open(src, "rb").read()
      blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
      with open(blob, "wb") as f:
        f.write(data)
      link = os.path.join(storage, "snapshots", commit, rel)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A hub cache with AILab-CVC/CV-VAE at `main` (vae3d, also as a bf16 variant, and vae3d_sd3) and at tag `v1`
  (vae3d whose plain file holds the bf16 weights); returns (cache dir, {(ref, subfolder): params})."""
  root = tmp_path_factory.mktemp("hub")
  cache_dir, params = str(root / "cache"), {}
  main, v1 = root / "main", root / "v1"
  for seed, sub in enumerate(("vae3d", "vae3d_sd3")):
    params["main", sub] = _random_params(TINY[sub], seed)
    cvvae_jax.save_pretrained(TINY[sub], params["main", sub], str(main / sub))
  bf16 = cvvae_jax.save_pretrained(TINY["vae3d"], params["main", "vae3d"], str(main / "vae3d"), dtype="bf16",
                                   variant="bf16")
  (v1 / "vae3d").mkdir(parents=True)
  shutil.copy(main / "vae3d" / "config.json", v1 / "vae3d" / "config.json")
  shutil.copy(os.path.join(bf16, weight_files.weights_name("bf16")), v1 / "vae3d" / weight_files.WEIGHTS_NAME)
  params["v1", "vae3d"] = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                                                 params["main", "vae3d"])
  for ref, src in (("main", main), ("v1", v1)):
    _add_to_cache(cache_dir, REPO_ID, ref, COMMITS[ref], str(src))
  return cache_dir, params


def _equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_load_by_hub_id_subfolder_revision_and_variant_offline(cache):
  cache_dir, params = cache
  kw = {"cache_dir": cache_dir, "local_files_only": True}
  vae, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d_sd3", **kw)
  assert vae == TINY["vae3d_sd3"]
  _equal(got, params["main", "vae3d_sd3"])
  _, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", revision="v1", **kw)
  _equal(got, params["v1", "vae3d"])
  _, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", revision=COMMITS["v1"], **kw)  # a commit hash
  _equal(got, params["v1", "vae3d"])
  _, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", variant="bf16", **kw)
  _equal(got, params["v1", "vae3d"])  # the same bf16 file
  _, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", **kw)
  _equal(got, params["main", "vae3d"])
  path = hub.resolve_model_path(REPO_ID, subfolder="vae3d", **kw)
  assert path == os.path.join(cache_dir, "models--AILab-CVC--CV-VAE", "snapshots", COMMITS["main"], "vae3d")


def test_missing_repo_revision_subfolder_and_file_are_clear_errors(cache, tmp_path):
  cache_dir, _ = cache
  kw = {"cache_dir": cache_dir, "local_files_only": True}
  with pytest.raises(FileNotFoundError, match=r"no local path 'nobody/nothing', and hub repo 'nobody/nothing' "
                     r"\(revision 'main'\) is not in the Hub cache .*cache \(no models--nobody--nothing/\); downloads "
                     r"are off \(HF_HUB_OFFLINE=1 or local_files_only=True\)"):
    cvvae_jax.load_pretrained("nobody/nothing", **kw)
  with pytest.raises(FileNotFoundError, match=r"hub repo 'AILab-CVC/CV-VAE' \(revision 'v2'\) is not in the Hub cache "
                     r".*models--AILab-CVC--CV-VAE \(cached refs: \['main', 'v1'\]\)"):
    cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", revision="v2", **kw)
  with pytest.raises(FileNotFoundError, match=r"hub repo 'AILab-CVC/CV-VAE' \(revision 'main', snapshot .*\) has no "
                     r"subfolder 'vae3d_v1-1'; folders with a config\.json: \['vae3d', 'vae3d_sd3'\]"):
    cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d_v1-1", **kw)
  with pytest.raises(FileNotFoundError, match=r"has no config\.json at its root; pass subfolder= one of "
                     r"\['vae3d', 'vae3d_sd3'\]"):
    cvvae_jax.load_pretrained(REPO_ID, **kw)
  with pytest.raises(FileNotFoundError, match=r"expected diffusion_pytorch_model\.fp16\.safetensors or its shard "
                     r"index .* it holds the variant\(s\) \['\(none\)', 'bf16'\]"):
    cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", variant="fp16", **kw)
  # A snapshot that lacks its weights file (e.g. an interrupted copy).
  cfg = tmp_path / "cfg_only"
  cfg.mkdir()
  (cfg / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  _add_to_cache(cache_dir, "someone/partial", "main", "c" * 40, str(cfg))
  with pytest.raises(ValueError, match=r"snapshots/c{40} is not a model: expected an original PyTorch folder"):
    cvvae_jax.load_pretrained("someone/partial", **kw)
  with pytest.raises(ValueError, match=r"revision='v1' is for Hub ids, but .* is a local path"):
    cvvae_jax.load_pretrained(str(cfg), revision="v1")
  with pytest.raises(ValueError, match=r"subfolder: expected a relative folder name"):
    cvvae_jax.load_pretrained(REPO_ID, subfolder="../x", **kw)


def test_a_local_path_wins_over_a_hub_id(cache, tmp_path, monkeypatch):
  cache_dir, params = cache
  local = tmp_path / "AILab-CVC" / "CV-VAE"
  other = _random_params(TINY["vae3d"], seed=7)
  cvvae_jax.save_pretrained(TINY["vae3d"], other, str(local / "vae3d"))
  monkeypatch.chdir(tmp_path)
  assert os.path.isdir(REPO_ID)
  _, got = cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d", cache_dir=cache_dir, local_files_only=True)
  _equal(got, other)
  with pytest.raises(FileNotFoundError, match=r"local path 'AILab-CVC/CV-VAE' has no subfolder 'vae3d_sd3'; folders "
                     r"with a config\.json: \['vae3d'\]"):
    cvvae_jax.load_pretrained(REPO_ID, subfolder="vae3d_sd3")


@pytest.mark.slow  # two fresh processes (JAX start-up)
def test_hf_hub_offline_and_hf_hub_cache_environment_are_honoured(cache):
  """A fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set (read by huggingface_hub at import), no cache_dir:
  the id resolves in that cache; without the repo there it fails saying downloads are off."""
  cache_dir, params = cache
  code = ("import sys, numpy as np, jax, cvvae_jax\n"
          "vae, p = cvvae_jax.load_pretrained(sys.argv[1], subfolder='vae3d_sd3')\n"
          "print(repr(float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(p)))))\n")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache_dir, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code, REPO_ID], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  want = float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(params["main", "vae3d_sd3"])))
  assert float(out.stdout.strip().splitlines()[-1]) == want
  out = subprocess.run([sys.executable, "-c", code, "nobody/nothing"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" in out.stderr


def test_download_patterns_fetch_config_and_the_requested_weights_only():
  assert hub.download_patterns("vae3d_sd3", None) == [
      "vae3d_sd3/config.json", "vae3d_sd3/diffusion_pytorch_model.safetensors",
      "vae3d_sd3/diffusion_pytorch_model-*.safetensors", "vae3d_sd3/diffusion_pytorch_model.safetensors.index.json",
      "vae3d_sd3/model.json", "vae3d_sd3/params/**"]
  fp16 = hub.download_patterns(None, "fp16")
  assert "diffusion_pytorch_model.fp16.safetensors" in fp16 and "*/config.json" in fp16
  assert "diffusion_pytorch_model.safetensors.index.fp16.json" in fp16
  assert not [p for p in fp16 if p.endswith(".bin")] and weight_files.weights_name("fp16") in fp16
  assert hub.is_hub_id(REPO_ID) and not hub.is_hub_id("gs://bucket/model") and not hub.is_hub_id("/abs/path")
  assert not hub.is_hub_id("a/b/c") and not hub.is_hub_id("just_a_name")


def test_the_repo_listing_is_asked_only_when_the_snapshot_lacks_what_is_wanted(tmp_path):
  """Online loads ask the Hub for the repo's file list (`hub._check_listing`) only to name what is missing: a
  snapshot holding the subfolder and the requested weights (or our Flax export) needs no extra request."""
  model = tmp_path / "vae3d"
  model.mkdir()
  (model / hub.CONFIG_NAME).write_text("{}")
  assert hub._lacks_wanted(str(tmp_path), "vae3d", None)            # config only: the weights are missing
  (model / weight_files.weights_name("bf16")).write_bytes(b"")
  assert not hub._lacks_wanted(str(tmp_path), "vae3d", "bf16")
  assert hub._lacks_wanted(str(tmp_path), "vae3d", None)            # the plain variant is still missing
  assert hub._lacks_wanted(str(tmp_path), "vae3d_sd3", None)        # no such subfolder in the snapshot
  assert not hub._lacks_wanted(str(tmp_path), None, None)           # the root is no model folder: named below
  (model / hub.FLAX_PATTERNS[0]).write_bytes(b"")
  assert not hub._lacks_wanted(str(tmp_path), "vae3d", None)        # our Flax export needs no PyTorch weights
