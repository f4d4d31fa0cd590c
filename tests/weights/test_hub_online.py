"""Loading by Hub id over HTTP, from a Hub API server on localhost (`tests/hub_server.py`): what is downloaded (the
config and the requested weights, never a pickle), the cache layout it leaves (then read offline), and the errors
for a missing repo, revision, subfolder or file, and a gated repo, as a user with `HF_ENDPOINT` set meets them."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

import cvvae_jax
from tests.hub_server import HubServer
from tests.weights.test_hub import REPO, TINY, _random_params

# Runs in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported.
SCRIPT = r"""
import json, sys
import numpy as np
import cvvae_jax

cache = sys.argv[1]
def attempt(*args, cache_dir=cache, **kw):
  try:
    vae, params = cvvae_jax.load_pretrained(*args, cache_dir=cache_dir, **kw)
    return {"ok": type(vae).__name__, "sum": float(sum(np.abs(np.asarray(x, np.float64)).sum()
                                                        for x in __import__("jax").tree.leaves(params)))}
  except Exception as e:
    return {"error": type(e).__name__, "message": str(e)}

print(json.dumps({
    "subfolder_fresh": attempt("AILab-CVC/CV-VAE", subfolder="vae3d_v1-1", cache_dir=cache + "_fresh"),
    "sd3": attempt("AILab-CVC/CV-VAE", subfolder="vae3d_sd3"),
    "bf16": attempt("AILab-CVC/CV-VAE", subfolder="vae3d", variant="bf16"),
    "repo": attempt("nobody/nothing"),
    "revision": attempt("AILab-CVC/CV-VAE", subfolder="vae3d", revision="v9"),
    "subfolder": attempt("AILab-CVC/CV-VAE", subfolder="vae3d_v1-1"),
    "variant": attempt("AILab-CVC/CV-VAE", subfolder="vae3d", variant="fp16"),
    "gated": attempt("someone/gated"),
    "pickles": attempt("someone/pickles"),
}))
"""


def _params_sum(params):
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def test_download_by_id_over_http_and_the_errors_a_user_meets(tmp_path):
  main = tmp_path / "repo_main"
  params = {}
  for seed, sub in enumerate(("vae3d", "vae3d_sd3")):
    params[sub] = _random_params(TINY[sub], seed)
    cvvae_jax.save_pretrained(TINY[sub], params[sub], str(main / sub))
  cvvae_jax.save_pretrained(TINY["vae3d"], params["vae3d"], str(main / "vae3d"), dtype="bf16", variant="bf16")
  (main / "vae3d" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle that must never be fetched")
  gated = tmp_path / "gated"
  cvvae_jax.save_pretrained(TINY["vae3d"], params["vae3d"], str(gated))
  pickles = tmp_path / "pickles"
  pickles.mkdir()
  (pickles / "config.json").write_text((gated / "config.json").read_text())
  (pickles / "diffusion_pytorch_model.bin").write_bytes(b"a pickle")
  cache = tmp_path / "cache"
  repos = {"AILab-CVC/CV-VAE": {"main": main}, "someone/gated": {"main": gated}, "someone/pickles": {"main": pickles}}
  with HubServer(repos, gated=("someone/gated",)) as hub:
    env = {**os.environ, "PYTHONPATH": REPO, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    fetched = [r.split()[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    commit = hub.commit("AILab-CVC/CV-VAE", "main")

  assert got["sd3"] == {"ok": "CVVAE", "sum": _params_sum(params["vae3d_sd3"])}, got["sd3"]
  assert got["bf16"]["ok"] == "CVVAE", got["bf16"]
  # Only configs and the requested weights came over the wire; never the pickle.
  assert not [f for f in fetched if f.endswith(".bin")], fetched
  assert any(f.endswith("vae3d_sd3/diffusion_pytorch_model.safetensors") for f in fetched), fetched
  assert any(f.endswith("vae3d/diffusion_pytorch_model.bf16.safetensors") for f in fetched), fetched
  assert not any(f.endswith("vae3d/diffusion_pytorch_model.safetensors") for f in fetched), fetched
  snapshot = cache / "models--AILab-CVC--CV-VAE" / "snapshots" / commit
  assert (snapshot / "vae3d_sd3" / "config.json").exists()
  # The errors say what is missing, and what exists.
  assert got["repo"]["error"] == "FileNotFoundError" and "no hub repo 'nobody/nothing' (revision 'main') on the Hub " \
      "and no local path 'nobody/nothing'" in got["repo"]["message"], got["repo"]
  assert got["revision"]["error"] == "FileNotFoundError" and "no such revision" in got["revision"]["message"], \
      got["revision"]
  for case in ("subfolder", "subfolder_fresh"):  # named from the repo's listing, also with nothing cached yet
    assert got[case]["error"] == "FileNotFoundError" and "has no subfolder 'vae3d_v1-1'; folders with a config.json: " \
        "['vae3d', 'vae3d_sd3']" in got[case]["message"], got[case]
  assert got["variant"]["error"] == "FileNotFoundError" and "the repo holds the variant(s) ['(none)', 'bf16'] there" \
      in got["variant"]["message"], got["variant"]
  assert got["pickles"]["error"] == "ValueError" and "PyTorch pickles only" in got["pickles"]["message"], got["pickles"]
  assert got["gated"]["error"] == "PermissionError" and "gated" in got["gated"]["message"], got["gated"]

  # The cache the download left is what an offline run reads.
  _, offline = cvvae_jax.load_pretrained("AILab-CVC/CV-VAE", subfolder="vae3d_sd3", cache_dir=str(cache),
                                         local_files_only=True)
  assert _params_sum(offline) == _params_sum(params["vae3d_sd3"])
