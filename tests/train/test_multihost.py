"""Multi-process training on one machine (`scripts/launch_local.py`: processes x CPU devices, gloo collectives).

One module fixture runs the jobs in order. All runs train tests/multihost_config.py (tiny CV-VAE, no regularizer,
LPIPS off, checkpoints every 2 steps) for N steps; the in-process runs and the single-process subprocess share one
compiled program (mesh data=4 fsdp=2 on 8 CPU devices) through the persistent compilation cache, while the
2-process launch compiles afresh (about a minute on 2 cores):

  error      2 x 4 with mesh.data=16: every process stops at start-up, naming the field;
  ref1       `python train.py` (1 process x 8 devices, mesh data=4 fsdp=2): N steps straight;
  sigterm    2 x 4, mesh data=2 fsdp=4 (parameters split across both processes, each host reading its own block
             of every global batch), a picture at step 2: SIGTERM to process 1 once process 0 has logged step 2
             -> both processes save step s and exit 0; compared with ref1;
  resharded  in-process (1 process, mesh data=4 fsdp=2, the 1-host data order) resumes s and trains to N;
             compared with ref1;
  kill       `python train.py` as ref1: kill -9 once it has logged step 3;
  restarted  `python train.py` again: resumes the killed run's latest checkpoint c; identical losses and final
             state (params, optimizer states, step, rng) to ref1;
  nan        in-process: ref1's step-4 checkpoint, then NaN batches; max_nan_steps=3 stops the run.

The bitwise comparison is between runs of `train.py`, the command a user restarts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cvvae_jax import data as data_lib
from cvvae_jax.train import checkpoint, loop
from cvvae_jax.weights import workdir as workdir_lib
from tests import multihost_config

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "scripts", "launch_local.py")
CONFIG = "tests/multihost_config.py"
N = 6                  # steps of every run
TIMEOUT_S = 600        # of one subprocess run
LOSSES = ("loss/total", "loss/nll", "loss/kl", "disc/loss", "disc/logits_real")
RTOL = 1e-4            # other meshes and process counts reduce in other orders (measured: ~1e-6)


class HostOrder:
  """The global batches of a `hosts`-process job, in one process: each host's own batch
  (`create_train_iterator(process_index=p, process_count=hosts)`) concatenated in process order, which is how
  `jax.make_array_from_process_local_data` lays them out on a mesh whose devices are ordered by process.
  From batch `nan_from` on, batches are all NaN."""

  def __init__(self, create, config, *, seed, start_step=0, hosts=2, nan_from=None, **unused):
    del unused
    self._hosts = [create(config, seed=seed, process_index=p, process_count=hosts, start_step=start_step)
                   for p in range(hosts)]
    self.step, self._nan_from = start_step, nan_from

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(h) for h in self._hosts]
    video = np.concatenate([p["video"] for p in parts])
    if self._nan_from is not None and self.step >= self._nan_from:
      video = np.full_like(video, np.nan)
    self.step += 1
    return {"video": video, "stream": parts[0]["stream"]}

  def state(self):
    return {"step": self.step}

  def close(self):
    for h in self._hosts:
      h.close()


def _config(mesh=(4, 2), **train):
  c = multihost_config.get_config(str(N))
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp = mesh
    for k, v in train.items():
      setattr(c.train, k, v)
  return c


def _train_in_process(workdir, config, hosts=1, nan_from=None):
  """train_and_evaluate in this process (8 CPU devices), reading the global batches of a `hosts`-process job."""
  original = data_lib.create_train_iterator
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data_lib, "create_train_iterator",
               lambda cfg, **kw: HostOrder(original, cfg, hosts=hosts, nan_from=nan_from, **kw))
    return loop.train_and_evaluate(config, workdir)


def _run(cmd, signal_at=None):
  """Runs `cmd` (train.py, directly or through the launcher) -> (exit status, output lines).

  `signal_at=(step, signum)`: once (process 0 of) the run has logged `step`, sends `signum` to process 1 of a
  launched job, or to the process itself.
  """
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pids, lines = {}, []
  timer = threading.Timer(TIMEOUT_S, lambda: [os.kill(p, signal.SIGKILL) for p in (*pids.values(), proc.pid)])
  timer.start()
  try:
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      if m := re.match(r"launch: process (\d+) pid (\d+)", line):
        pids[int(m[1])] = int(m[2])
      if signal_at and re.match(rf"(\[p0\] )?I.*loop\.py:\d+\] step {signal_at[0]}/{N} ", line):
        os.kill(pids.get(1, proc.pid), signal_at[1])
        signal_at = None
    rc = proc.wait(timeout=60)
  finally:
    timer.cancel()
  print("\n".join(lines[-30:]))  # shown by pytest on failure
  return rc, lines


def _launch(workdir, overrides=(), signal_at=None):
  """train.py as 2 processes x 4 CPU devices."""
  return _run([sys.executable, LAUNCHER, "-n", "2", "-d", "4", "--", "train.py", "--config", f"{CONFIG}:{N}",
               "--workdir", workdir, *overrides], signal_at)


def _train_cli(workdir, signal_at=None):
  """`python train.py` as 1 process x 8 CPU devices (mesh data=4 fsdp=2)."""
  return _run([sys.executable, "train.py", "--config", f"{CONFIG}:{N}", "--workdir", workdir,
               "--config.mesh.data=4", "--config.mesh.fsdp=2"], signal_at)


def _saved_state(workdir, step=N):
  """The whole train state saved at `step`, as a pytree of arrays."""
  path = workdir_lib.checkpoint_dir(workdir) / str(step) / "state"
  return ocp.StandardCheckpointer().restore(path)


def _history(workdir):
  with open(os.path.join(workdir, "history.json")) as f:
    return {k: dict((int(s), v) for s, v in pairs) for k, pairs in json.load(f).items()}


def _committed(workdir):
  ckpt = checkpoint.CheckpointManager(workdir, read_only=True, enable_async_checkpointing=False)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.manager.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("multihost")
  out, t0 = {"dir": d, "seconds": {}}, time.time()

  def done(stage):
    nonlocal t0
    out["seconds"][stage], t0 = round(time.time() - t0), time.time()

  # A config that cannot run fails at start-up in every process (no compile).
  out["error"] = _launch(str(d / "error"), ["--config.mesh.data=16"])
  done("error")

  # 1 process: the reference.
  out["ref1"] = (_train_cli(str(d / "ref1")), _history(str(d / "ref1")))
  done("ref1")
  # 2 processes: parameters split over 4 devices of each process (fsdp=4 spans both); SIGTERM to process 1.
  out["sigterm"] = _launch(str(d / "job2"), ["--config.mesh.data=2", "--config.mesh.fsdp=4",
                                             "--config.train.image_every_steps=2"], signal_at=(2, signal.SIGTERM))
  out["pictures"] = sorted(os.listdir(d / "job2" / "images")) if (d / "job2" / "images").is_dir() else []
  out["sigterm_history"], out["sigterm_steps"] = _history(str(d / "job2")), _committed(str(d / "job2"))
  os.remove(d / "job2" / "history.json")  # so that the resumed history holds the resumed steps alone
  done("sigterm")
  # ... resumed by 1 process on another mesh.
  out["resharded"] = (_train_in_process(str(d / "job2"), _config()), _history(str(d / "job2")))
  done("resharded")

  # 1 process (ref1's program, from the compilation cache): kill -9, then the same command again.
  out["kill"] = _train_cli(str(d / "job1"), signal_at=(3, signal.SIGKILL))
  out["kill_steps"] = _committed(str(d / "job1"))
  done("kill")
  out["restarted"] = (_train_cli(str(d / "job1")), _history(str(d / "job1")))
  done("restarted")

  # NaN batches from step 5 on, resuming a copy of ref1's step-4 checkpoint.
  shutil.copytree(d / "ref1" / "checkpoints" / "4", d / "nan" / "checkpoints" / "4")
  try:
    _train_in_process(str(d / "nan"), _config(max_nan_steps=3, num_steps=N + 2), nan_from=4)
    out["nan_error"] = None
  except FloatingPointError as e:
    out["nan_error"] = str(e)
  done("nan")
  print("seconds per stage:", out["seconds"])
  return out


def _assert_losses_match(got, ref, steps, rtol=RTOL):
  for key in LOSSES:
    for step in steps:
      if step in ref[key]:
        np.testing.assert_allclose(got[key][step], ref[key][step], rtol=rtol, err_msg=f"{key} at step {step}")


def _steps(history):
  return sorted([*history["loss/total"], *history["disc/loss"]])  # generator and discriminator steps


def test_launcher_stops_the_job_when_a_process_dies(tmp_path):
  script = ('echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $XLA_FLAGS $JAX_PLATFORMS"; '
            'if [ "$JAX_PROCESS_ID" = 1 ]; then kill -9 $$; fi; sleep 60')
  rc, lines = _run([sys.executable, LAUNCHER, "-n", "2", "-d", "3", "--grace_s", "1", "--", "sh", "-c", script])
  assert rc == 128 + signal.SIGKILL, rc
  for p in (0, 1):
    assert any(re.fullmatch(rf"\[p{p}\] {p}/2 127\.0\.0\.1:\d+ (.* )?--xla_force_host_platform_device_count=3 cpu",
                            l) for l in lines), lines
  assert "launch: process 1 failed (killed by SIGKILL); stopping the others in 1s" in lines
  assert lines[-2:] == ["launch: process 0 killed by SIGKILL", "launch: process 1 killed by SIGKILL"]


def test_startup_config_error_stops_every_process(runs):
  rc, lines = runs["error"]
  assert rc == 1, rc
  for p in (0, 1):
    assert any(l.startswith(f"[p{p}] ") and "mesh.data * mesh.fsdp = 16 but 8 devices are available" in l
               for l in lines), f"process {p} did not report the mesh error"
  assert lines[-2:] == ["launch: process 0 exit status 1", "launch: process 1 exit status 1"]


def test_two_processes_match_one_process_and_sigterm_saves(runs):
  rc, lines = runs["sigterm"]
  assert rc == 0, f"launcher exit status {rc}"
  s = runs["sigterm_steps"][-1]
  assert 2 <= s < N, runs["sigterm_steps"]  # the preemption sync point: 2 or 3, by when the signal lands
  for p in (0, 1):
    assert any(l.startswith(f"[p{p}] ") and f"preemption signal: saved step {s}, exiting" in l for l in lines)
  # Both processes report their devices; only process 0 logs training progress (and writes history.json).
  assert any(l.startswith("[p1] ") and "process 1 of 2, 4 local / 8 global devices" in l for l in lines)
  assert any(re.match(rf"\[p0\] .*step 1/{N} ", l) for l in lines)
  assert not any(re.match(rf"\[p1\] .*step \d+/{N} ", l) for l in lines)
  history = runs["sigterm_history"]
  assert _steps(history) == list(range(1, s + 1))
  # Every process ran the reconstruction of (sharded) params at step 2; process 0 wrote the picture.
  assert runs["pictures"] == ["reconstruction_0000002.png"]
  assert runs["ref1"][0][0] == 0
  _assert_losses_match(history, runs["ref1"][1], range(1, s + 1))


def test_restore_on_another_mesh_and_process_count_continues(runs):
  s = runs["sigterm_steps"][-1]
  state, history = runs["resharded"]
  assert _steps(history) == list(range(s + 1, N + 1)) and int(state.step) == N
  ref = runs["ref1"][1]
  _assert_losses_match(history, ref, range(s + 1, N + 1))
  ref_params = _saved_state(str(runs["dir"] / "ref1"))["params"]
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_kill9_then_restart_gives_identical_losses(runs):
  rc, lines = runs["kill"]
  assert rc == -signal.SIGKILL, rc
  c = runs["kill_steps"][-1]
  assert 2 <= c < N, runs["kill_steps"]
  (restart_rc, _), history = runs["restarted"]
  assert restart_rc == 0
  # history.json: the killed run's steps up to its checkpoint c, then the restarted run's, each step once.
  assert _steps(history) == list(range(1, N + 1))
  _assert_losses_match(history, runs["ref1"][1], range(1, N + 1), rtol=0)
  d = runs["dir"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, _saved_state(str(d / "job1")), _saved_state(str(d / "ref1")))


def test_nan_streak_stops_the_run_with_the_last_checkpoint_intact(runs):
  assert runs["nan_error"] is not None, "the run with NaN batches did not stop"
  assert re.search(r"^3 consecutive steps \(up to 7\) had non-finite loss or gradients and were skipped "
                   r"\(config.train.max_nan_steps=3\); the last good checkpoint is step 6 in .*/nan/checkpoints$",
                   runs["nan_error"]), runs["nan_error"]
  d = runs["dir"]
  assert _committed(str(d / "nan")) == [4, 6]
  # Steps 5 and 6 were skipped: step 6 holds step 4's parameters, finite.
  _, at6 = workdir_lib.load_model_from_workdir(str(d / "nan"), step=6)
  _, at4 = workdir_lib.load_model_from_workdir(str(d / "ref1"), step=4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, at6, at4)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(at6))


def test_two_host_batches_form_the_one_host_batch():
  config = multihost_config.get_config().data
  one = data_lib.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  two = HostOrder(data_lib.create_train_iterator, config, seed=0)
  try:
    for _ in range(2):
      np.testing.assert_array_equal(next(two)["video"], next(one)["video"])
  finally:
    one.close()
    two.close()
