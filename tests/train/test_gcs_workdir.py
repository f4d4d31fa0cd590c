"""`gs://` workdirs, models and data folders against a real GCS JSON-API server on localhost (fake-gcs-server, the
`gcs_server` fixture of tests/conftest.py), and a training history that survives a kill and a resume.

Default suite: paths and atomic writes, a Flax export and a data folder on the bucket, TensorBoard events mirrored to
it, `History.resume`, and a workdir that loads without warnings. Slow: `python train.py` on gs:// three times (the
command a user restarts): straight for N steps; killed with SIGKILL after its step-2 checkpoint; the same command
again, resuming from the bucket; `load_pretrained("gs://...")` reads both. And `evaluate.py --model gs://... --data
gs://... --out gs://...` on a workdir saved to the bucket.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from clu import metric_writers
from etils import epath

import cvvae_jax
from cvvae_jax import paths
from cvvae_jax.data import embedded, folders
from cvvae_jax.train import checkpoint, records
from cvvae_jax.weights import workdir as workdir_lib
from tests import helpers
from tests.train.test_multihost import CONFIG, ROOT, N, _run, _steps

LOSSES = ("loss/total", "loss/nll", "loss/kl", "disc/loss", "disc/logits_real")


def _tiny_image_vae():
  vae = cvvae_jax.ImageVAE(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, num_groups=4)
  return vae, jax.jit(vae.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 3)))["params"]


def test_paths_normalize_and_write_atomically(gcs_server, tmp_path):
  assert paths.normalize("gs://b/x/") == "gs://b/x" and paths.is_remote("gs://b") and not paths.is_remote("/a")
  assert paths.normalize(str(tmp_path / "a" / ".." / "b")) == str(tmp_path / "b")
  with pytest.raises(ValueError, match="expected a path"):
    paths.path("")
  local = tmp_path / "sub" / "h.json"
  paths.write_atomic(local, '{"a": 1}')
  paths.write_atomic(local, b'{"a": 2}')
  assert json.loads(local.read_text()) == {"a": 2} and os.listdir(local.parent) == ["h.json"]  # no temporaries
  remote = gcs_server.bucket("paths") + "/deep/h.json"
  paths.write_atomic(remote, '{"b": 1}')
  assert epath.Path(remote).read_text() == '{"b": 1}'
  assert gcs_server.objects("paths") == ["deep/h.json"]


def test_flax_export_on_a_bucket_loads_back(gcs_server):
  vae, params = _tiny_image_vae()
  where = cvvae_jax.save_flax(vae, params, gcs_server.bucket("models") + "/image_vae")
  assert where == "gs://models/image_vae"
  assert "image_vae/model.json" in gcs_server.objects("models")
  loaded_vae, loaded = cvvae_jax.load_pretrained(where)
  assert loaded_vae == vae
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(FileNotFoundError, match="no such model path: gs://models/missing"):
    cvvae_jax.load_pretrained("gs://models/missing")


def test_original_pytorch_folder_on_a_bucket_loads_like_a_local_one(gcs_server, tmp_path):
  local = helpers.write_golden_folder("sd21_image_vae_tiny", str(tmp_path / "torch"))
  remote = gcs_server.bucket("torch-models") + "/sd21_image_vae_tiny"
  for name in os.listdir(local):
    epath.Path(f"{remote}/{name}").write_bytes((tmp_path / "torch" / name).read_bytes())
  vae, params = cvvae_jax.load_pretrained(local)
  remote_vae, remote_params = cvvae_jax.load_pretrained(remote)
  assert remote_vae == vae
  jax.tree_util.tree_map(np.testing.assert_array_equal, remote_params, params)


def test_data_folder_on_a_bucket_lists_and_reads_like_a_local_one(gcs_server, tmp_path):
  files = {"a.mp4": b"1", "sub/b.png": b"22", "sub/deeper/c.jpg": b"333", ".hidden/d.png": b"4", "e.txt": b"55"}
  bucket = gcs_server.bucket("data")
  for rel, data in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
    epath.Path(f"{bucket}/clips/{rel}").write_bytes(data)
  listed = folders.list_files(f"{bucket}/clips")
  assert listed == folders.list_files(str(tmp_path)) == ["a.mp4", "e.txt", "sub/b.png", "sub/deeper/c.jpg"]
  assert [folders.read_file(f"{bucket}/clips", r) for r in listed] == [files[r] for r in listed]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    folders.list_files(f"{bucket}/nothing_here")


def test_refresh_shows_what_another_writer_added(gcs_server):
  folder = epath.Path(gcs_server.bucket("listing") + "/ckpt")
  (folder / "1" / "f").write_bytes(b"1")
  assert [p.name for p in folder.iterdir()] == ["1"]
  gcs_server.upload("listing", "ckpt/2/f", b"2")   # e.g. a trainer in another process saves step 2
  assert [p.name for p in folder.iterdir()] == ["1"]  # gcsfs answers from its listing cache
  paths.refresh(folder)
  assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]
  paths.refresh("/a/local/path")  # nothing to forget


def test_tensorboard_events_of_a_bucket_workdir_are_copied_there(gcs_server, tmp_path):
  workdir = gcs_server.bucket("events") + "/run"
  writer = records.create_writer(workdir)
  assert isinstance(writer, records.MirroredWriter)
  writer.write_scalars(1, {"loss/total": 0.5})
  writer.flush()
  writer.write_scalars(2, {"loss/total": 0.25})
  writer.close()
  assert not os.path.exists(writer.local_dir)
  (name,) = [n for n in gcs_server.objects("events") if "tfevents" in n]
  copy = tmp_path / "events"
  copy.write_bytes(epath.Path(f"gs://events/{name}").read_bytes())
  got = {(e.step, v.tag): float(tf.make_ndarray(v.tensor)) for e in tf.compat.v1.train.summary_iterator(str(copy))
         for v in e.summary.value}
  assert got == {(1, "loss/total"): 0.5, (2, "loss/total"): 0.25}


def test_history_resumes_up_to_the_restored_step(tmp_path):
  writer = metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  first = records.History(writer)
  for step in (0, 1, 2, 3, 4):
    first.record(step, {"loss/total": 1.0 / (step + 1), **({"val/psnr": 10.0 + step} if step % 2 == 0 else {})})
  first.save(tmp_path)
  assert (tmp_path / records.CURVES_PNG).is_file()
  resumed = records.History(writer)
  resumed.resume(tmp_path, 2)   # the checkpoint of step 2: steps 3 and 4 run again
  assert resumed.values == {"loss/total": [(0, 1.0), (1, 0.5), (2, 1 / 3)], "val/psnr": [(0, 10.0), (2, 12.0)]}
  resumed.record(3, {"loss/total": 0.2})
  resumed.save(tmp_path, curves=None)
  assert json.loads((tmp_path / records.HISTORY_JSON).read_text())["loss/total"] == [
      [0, 1.0], [1, 0.5], [2, 1 / 3], [3, 0.2]]
  (tmp_path / records.HISTORY_JSON).write_text("{not json")
  with pytest.raises(ValueError, match="history.json: expected the JSON history"):
    records.History(writer).resume(tmp_path, 2)


def test_loading_a_workdir_logs_no_warning(tmp_path, caplog):
  vae, params = _tiny_image_vae()
  manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False)
  manager.save(1, {"params": {"vae": params}}, checkpoint.make_meta(model=vae), force=True)
  manager.close()
  with caplog.at_level(logging.WARNING):
    _, loaded = cvvae_jax.load_pretrained(str(tmp_path))
    assert workdir_lib.read_meta(str(tmp_path))["model"]["class"] == "ImageVAE"
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  assert workdir_lib.checkpoint_dir(tmp_path).is_dir()
  assert sorted(os.listdir(workdir_lib.checkpoint_dir(tmp_path))) == ["1"]  # the reader wrote nothing


# ------------------------------------------------------------------------------------------- slow: train.py on gs://


def _train_cli(workdir, signal_at=None):
  """`python train.py` as 1 process x 8 CPU devices (mesh data=4 fsdp=2): the program of tests/train/test_multihost.py,
  from the compilation cache when that ran."""
  return _run([sys.executable, "train.py", "--config", f"{CONFIG}:{N}", "--workdir", workdir,
               "--config.mesh.data=4", "--config.mesh.fsdp=2"], signal_at)


def _history(workdir):
  pairs = json.loads((epath.Path(workdir) / records.HISTORY_JSON).read_text())
  return {k: [(int(s), v) for s, v in p] for k, p in pairs.items()}


@pytest.fixture(scope="module")
def gcs_runs(gcs_server):
  bucket = gcs_server.bucket("train-runs")
  out = {"bucket": bucket}
  out["ref"] = _train_cli(f"{bucket}/ref")
  out["killed"] = _train_cli(f"{bucket}/job", signal_at=(3, signal.SIGKILL))
  with workdir_lib.CheckpointReader(f"{bucket}/job") as reader:
    out["killed_steps"] = reader.all_steps()
  out["killed_history"] = _history(f"{bucket}/job")
  out["restarted"] = _train_cli(f"{bucket}/job")
  return out


@pytest.mark.slow
def test_gcs_run_killed_and_resumed_gives_identical_losses_and_history(gcs_runs, gcs_server):
  bucket = gcs_runs["bucket"]
  assert gcs_runs["ref"][0] == 0 and gcs_runs["killed"][0] == -signal.SIGKILL and gcs_runs["restarted"][0] == 0
  restarted_log = gcs_runs["restarted"][1]
  assert any("resumed from gs://train-runs/job/checkpoints" in line for line in restarted_log)
  assert not any("AdaptiveReadaheadCache" in line or "read only" in line for line in restarted_log)
  c = gcs_runs["killed_steps"][-1]
  assert 2 <= c < N, gcs_runs["killed_steps"]
  # The killed run's history was written as it went: every step up to the kill (at least up to its checkpoint).
  assert set(range(1, c + 1)) <= set(_steps({k: dict(v) for k, v in gcs_runs["killed_history"].items()}))
  ref, job = _history(f"{bucket}/ref"), _history(f"{bucket}/job")
  for key in LOSSES:  # every logged step since 0 exactly once, bitwise equal to the straight run
    assert [s for s, _ in job[key]] == sorted({s for s, _ in job[key]}), key
    assert job[key] == ref[key], key
  assert _steps({k: dict(v) for k, v in job.items()}) == list(range(1, N + 1))
  objects = gcs_server.objects("train-runs", "job/")
  for name in ("job/history.json", "job/loss_curves.png", "job/config.json", f"job/checkpoints/{N}/commit_success.txt"):
    assert name in objects, name
  assert any("tfevents" in n for n in objects)
  assert json.loads(epath.Path(f"{bucket}/job/config.json").read_text())["train"]["num_steps"] == N
  # load_pretrained reads both workdirs from the bucket; the resumed run ends with the straight run's params.
  _, ref_params = cvvae_jax.load_pretrained(f"{bucket}/ref")
  _, job_params = cvvae_jax.load_pretrained(f"{bucket}/job")
  jax.tree_util.tree_map(np.testing.assert_array_equal, job_params, ref_params)


@pytest.mark.slow
def test_evaluate_reads_a_gcs_model_and_data_and_writes_its_outputs_there(gcs_server):
  bucket = gcs_server.bucket("eval-runs")
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4)
  params = jax.jit(vae.init)(jax.random.PRNGKey(1), jnp.zeros((1, 5, 16, 16, 3)))["params"]
  manager = checkpoint.CheckpointManager(f"{bucket}/ref", enable_async_checkpointing=False)  # a training workdir
  manager.save(1, {"params": {"vae": params}}, checkpoint.make_meta(model=vae), force=True)
  manager.close()
  src = embedded.split_folder(
      os.path.join(os.path.dirname(embedded.prepare_embedded_dataset("~/.cache/cvvae_jax/data")), "src"), "video")
  for name in sorted(os.listdir(src))[:2]:
    with open(os.path.join(src, name), "rb") as f:
      epath.Path(f"{bucket}/clips/{name}").write_bytes(f.read())
  out = f"{bucket}/eval"
  cmd = [sys.executable, "evaluate.py", f"--model={bucket}/ref", f"--data={bucket}/clips", f"--out={out}",
         "--image_vae=none", "--frames=5", "--stride=2", "--resolution=16", "--batch_size=2", "--no-lpips", "--no-fvd",
         "--num_samples=0"]
  run = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| Method | Params enc+dec | Frame compression | PSNR" in run.stdout  # metrics.md, read from the bucket
  assert "AdaptiveReadaheadCache" not in run.stderr  # fsspec's INFO line per file read stays quiet
  written = gcs_server.objects("eval-runs", "eval/")
  assert {"eval/metrics.json", "eval/metrics.md", "eval/per_frame.png"} <= set(written), written
  report = json.loads(epath.Path(f"{out}/metrics.json").read_text())
  assert report["models"]["model"]["class"] == "CVVAE" and report["models"]["model"]["path"] == f"{bucket}/ref"
  assert report["data"]["num_clips"] == 2 and report["data"]["num_skipped"] == 0
  assert 3.0 < report["results"]["recon/model"]["psnr"]["mean"] < 60.0
