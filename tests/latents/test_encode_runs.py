"""The encode command as users run it (subprocesses): killed with SIGKILL mid-way and rerun, it gives the files of
an uninterrupted run byte for byte; 2 processes x 2 devices (`scripts/launch_local.py`) give the files of 1 process.
All runs go through a subprocess (XLA:CPU may round the last bit differently in the pytest process, see
tests/eval/test_eval_devices.py), each with one clip per device and step."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cvvae_jax import latents
from cvvae_jax.latents import records
from tests.latents.conftest import REPO, command, run_command

pytestmark = pytest.mark.slow  # minutes: five encode jobs of the tiny model
FLAGS = ["--batch_size=2", "--clips_per_shard=2"]  # 10 clips in 5 shards, one clip per device and step


def _files(out):
  """Every file but latents.json (its versions name the devices), as bytes."""
  return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n != records.INFO_NAME}


def _assert_same_dataset(out, reference):
  assert _files(out) == _files(reference)  # shard files and manifests, byte for byte; no temporary file left
  ours, ref = latents.LatentDataset(out), latents.LatentDataset(reference)
  assert ours.clips.tolist() == list(range(10))  # no clip twice, none missing
  for i in range(len(ref)):
    for a, b in zip(ours.posterior(i), ref.posterior(i)):
      np.testing.assert_array_equal(a, b)
  info, ref_info = records.read_info(out), records.read_info(reference)
  assert records.settings_differences(info, ref_info) == [] and info["summary"] == ref_info["summary"]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
  out = tmp_path_factory.mktemp("reference") / "latents"
  run_command(command(tiny_model, out, *FLAGS))
  return out


def test_killed_and_rerun_gives_the_uninterrupted_files(tiny_model, reference, tmp_path):
  out = tmp_path / "latents"
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.Popen(command(tiny_model, out, *FLAGS), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 600
  while not (out.exists() and any(n.endswith(".json") and "-of-" in n for n in os.listdir(out))):
    assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a shard was complete"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)  # one shard complete, the next being written
  assert proc.wait() == -signal.SIGKILL
  done = [n for n in os.listdir(out) if n.endswith(".json") and "-of-" in n]
  assert 1 <= len(done) < 5, done
  assert "summary" not in records.read_info(out)
  rerun = run_command(command(tiny_model, out, *FLAGS))
  assert "10 stored, 0 skipped" in rerun.stdout
  _assert_same_dataset(out, reference)


def test_two_processes_give_the_files_of_one(tiny_model, reference, tmp_path):
  out = tmp_path / "latents"
  launch = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"), "-n", "2", "-d", "2", "--",
            *command(tiny_model, out, "--batch_size=2", "--clips_per_shard=2")]
  done = run_command(launch)
  assert "[p0] encode_latents: " in done.stdout and "10 stored" in done.stdout
  assert "[p1] encode_latents: " in done.stdout  # process 1 encoded its own shards
  _assert_same_dataset(out, reference)
