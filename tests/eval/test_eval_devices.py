"""Evaluation on every device of every process gives the numbers of one device: 8 CPU devices in this process, and
2 processes x 4 devices (`scripts/launch_local.py` running `evaluate.py`), against batches of one clip on one
device. Per-clip metrics, I3D features and latent statistics are compared bit for bit."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cvvae_jax.eval import config, run
from cvvae_jax.eval import report as report_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIPS = 9  # the embedded held-out clips (validation split): batches of 8 leave a partial last one
pytestmark = pytest.mark.slow  # minutes: three evaluations of 9 clips with I3D


def _settings(golden, out, batch_size):
  return dict(model=golden["cvvae_sd21_tiny"], baseline=golden["sd21_image_vae_tiny"], data="embedded:video",
              out=str(out), frames=9, stride=2, resolution=(32, 48), batch_size=batch_size, fvd_bootstrap=10,
              num_samples=0, progress=False)


@pytest.fixture(scope="module")
def one_device(golden, tmp_path_factory):
  """The reference: one clip per step on one device."""
  out = tmp_path_factory.mktemp("one_device")
  return run.evaluate(config.EvalConfig(**_settings(golden, out, 1))), out


def _as_written(report):
  """The report as metrics.json holds it (JSON types)."""
  return json.loads(json.dumps(report_lib.json_safe(report)))


def _assert_same(report, reference, out, reference_out):
  report, reference = _as_written(report), _as_written(reference)
  assert report["data"]["num_clips"] == reference["data"]["num_clips"] == CLIPS
  assert report["per_clip"] == reference["per_clip"]  # paths in dataset order, every value bit for bit
  assert report["results"] == reference["results"]
  assert report["latent_statistics"] == reference["latent_statistics"]
  assert report["fvd"] == reference["fvd"]
  ours, ref = np.load(os.path.join(out, "features.npz")), np.load(os.path.join(reference_out, "features.npz"))
  assert set(ours.files) == set(ref.files) == {"paths", "input", "recon_model", "recon_baseline"}
  for name in ref.files:
    np.testing.assert_array_equal(ours[name], ref[name])


def test_eight_devices_give_the_numbers_of_one(golden, one_device, tmp_path):
  assert jax.local_device_count() == 8
  out = tmp_path / "eight"
  report = run.evaluate(config.EvalConfig(**_settings(golden, out, 8)))
  assert report["devices"] == {"devices": 8, "processes": 1}
  assert one_device[0]["devices"] == {"devices": 1, "processes": 1}
  _assert_same(report, one_device[0], out, one_device[1])


def _launch(golden, out, processes, batch_size):
  """`evaluate.py` in `processes` processes of 4 CPU devices each (`scripts/launch_local.py`); returns metrics.json
  and the printed output."""
  s = _settings(golden, out, batch_size)
  args = [f"--model={s['model']}", f"--baseline={s['baseline']}", f"--data={s['data']}", f"--out={out}",
          "--frames=9", "--stride=2", "--resolution=32x48", f"--batch_size={batch_size}", "--fvd_bootstrap=10",
          "--num_samples=0", "--no-progress"]
  cmd = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"), "-n", str(processes), "-d", "4", "--",
         os.path.join(REPO, "evaluate.py"), *args]
  done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO,
                        timeout=1200)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  return json.loads((out / "metrics.json").read_text()), done.stdout


def test_two_processes_give_the_numbers_of_one(golden, tmp_path):
  """The reference runs under the same launcher (one process, batches of one clip on one device): XLA:CPU rounds
  the last bit of some values differently in the pytest process (its flags and compilation cache) than in the
  launched processes, whatever the device count."""
  reference, _ = _launch(golden, tmp_path / "one", 1, 1)
  report, stdout = _launch(golden, tmp_path / "two", 2, 8)
  assert "[p0] | Method |" in stdout  # process 0 prints the table
  assert reference["devices"] == {"devices": 1, "processes": 1}
  assert report["devices"] == {"devices": 8, "processes": 2}
  _assert_same(report, reference, tmp_path / "two", tmp_path / "one")
