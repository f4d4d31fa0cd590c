"""Checkpoint faults a long run meets (issue #19): checksums, fallback past damaged steps, faults during a save, and
`cvvae-checkpoint verify`.

Default suite (seconds): a small state saved by `CheckpointManager` in a real local folder, then damaged on disk (a
byte flipped, a file truncated): checksums catch it, `restore_latest` falls back and moves the step aside, keep-N
spares the restored step, nothing restoring is an error listing each step; a save into a read-only folder is one
clear `CheckpointSaveError` (as root: in a subprocess running as nobody, else on a read-only bind mount); saves on
the GCS server through a proxy that answers 503 (tests/gcs_proxy.py) are retried until the outage ends, and an
outage that outlasts the retries is one clear error. Slow: `python train.py` (the command a user restarts), 4 runs
in all: a workdir on a small tmpfs that fills during a save (inside `unshare -rm`, so no mount outlives the test),
then the same command after space was freed; that workdir, copied locally and onto the local GCS-API server, with a
truncated array file of its latest step, restarted on each.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from gcsfs import retry as gcsfs_retry
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from cvvae_jax.train import checkpoint, integrity, records, verify
from tests import gcs_proxy
from tests.train.test_multihost import CONFIG, ROOT


def _state(seed: float):
  return {"params": {"w": jnp.full((64, 64), seed, jnp.float32), "b": jnp.arange(512, dtype=jnp.float32) + seed},
          "step": jnp.asarray(int(seed), jnp.int32)}


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(0))


def _save(workdir, steps, **kwargs) -> None:
  manager = checkpoint.CheckpointManager(str(workdir), enable_async_checkpointing=False, **kwargs)
  for s in steps:
    manager.save(s, _state(s), checkpoint.make_meta(data_state={"step": s}), force=True)
  manager.close()


def _array_files(step_dir) -> list[str]:
  """The step's array data files (OCDBT data), largest first."""
  d = epath.Path(step_dir) / "state" / "ocdbt.process_0" / "d"
  return sorted((os.fspath(p) for p in d.iterdir()), key=lambda p: -epath.Path(p).stat().length)


def _flip_byte(path) -> None:
  p = epath.Path(path)
  data = bytearray(p.read_bytes())
  data[len(data) // 2] ^= 0x01
  p.write_bytes(bytes(data))


def _truncate(path, size=100) -> None:
  p = epath.Path(path)
  p.write_bytes(p.read_bytes()[:size])


def test_checksums_are_recorded_and_catch_a_flipped_byte(tmp_path):
  _save(tmp_path, [1, 2])
  step_dir = tmp_path / "checkpoints" / "2"
  record = json.loads((step_dir / integrity.CHECKSUMS_FILE).read_text())
  files = [os.path.relpath(os.path.join(d, n), step_dir) for d, _, ns in os.walk(step_dir) for n in ns
           if n != integrity.CHECKSUMS_FILE]
  assert record["algorithm"] == "crc32c" and sorted(record["files"]) == sorted(files)
  assert integrity.verify_step(step_dir) == record
  victim = _array_files(step_dir)[0]
  size = os.path.getsize(victim)
  _flip_byte(victim)
  assert os.path.getsize(victim) == size
  rel = os.path.relpath(victim, step_dir)
  with pytest.raises(integrity.CheckpointIntegrityError, match=rf"checkpoint step 2: {rel}: crc32c .* when saved"):
    integrity.verify_step(step_dir)


def test_restore_falls_back_past_a_damaged_step_and_moves_it_aside(tmp_path, caplog):
  _save(tmp_path, [1, 2, 3])
  _flip_byte(_array_files(tmp_path / "checkpoints" / "3")[0])
  manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False, max_to_keep=2)
  state, meta = manager.restore_latest(_abstract())
  assert int(state["step"]) == 2 and meta["data"] == {"step": 2}
  np.testing.assert_array_equal(state["params"]["w"], np.full((64, 64), 2.0))
  assert manager.restored_step == 2 and [s["step"] for s in manager.skipped] == [3]
  assert manager.skipped[0]["moved_to"] == "3.corrupt" and "crc32c" in manager.skipped[0]["error"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3.corrupt"]
  assert manager.all_steps() == [1, 2]
  assert any("skipped checkpoint step 3" in r.getMessage() for r in caplog.records)
  # keep-N (2) spares the restored step 2: after saving 4 and 5, steps 2, 4 and 5 remain; 3.corrupt stays.
  for s in (4, 5):
    manager.save(s, _state(s), checkpoint.make_meta(), force=True)
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3.corrupt", "4", "5"]


def test_unverified_truncated_step_falls_back_and_nothing_restoring_lists_each_step(tmp_path):
  _save(tmp_path, [1, 2])
  for s in (1, 2):
    _truncate(_array_files(tmp_path / "checkpoints" / str(s))[0])
  manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False, verify=False)
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=r"no checkpoint in .* restores \(nothing was moved\): step 2: .*; step 1: "):
    manager.restore_latest(_abstract())
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_intact_step_of_another_structure_is_an_error_not_damage(tmp_path):
  _save(tmp_path, [1])
  other = dict(_abstract(), extra=_abstract()["step"])
  manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False)
  with pytest.raises(ValueError, match="step 1 .* passed its checksums but does not restore"):
    manager.restore_latest(other)
  manager.close()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_history_records_the_fallback(tmp_path):
  writer = records.create_writer(str(tmp_path), just_logging=True)
  history = records.History(writer)
  history.record(1, {"loss/total": 1.0})
  history.note(2, records.CHECKPOINT_FALLBACK, [{"step": 4, "error": "x", "moved_to": "4.corrupt"}])
  history.save(tmp_path, curves=None)
  saved = json.loads((tmp_path / records.HISTORY_JSON).read_text())
  assert saved[records.CHECKPOINT_FALLBACK] == [[2, [{"step": 4, "error": "x", "moved_to": "4.corrupt"}]]]


# The save of step 2 into WORKDIR (step 1 saved there already), in its own process: prints the error line.
_SAVE_STEP_2 = """
import sys
import jax.numpy as jnp
from cvvae_jax.train import checkpoint
state = {"params": {"w": jnp.full((64, 64), 2.0), "b": jnp.arange(512.0) + 2}, "step": jnp.asarray(2, jnp.int32)}
manager = checkpoint.CheckpointManager(sys.argv[1], enable_async_checkpointing=False)
try:
  manager.save(2, state, checkpoint.make_meta(), force=True)
  print("saved")
except checkpoint.CheckpointSaveError as e:
  print(f"CheckpointSaveError: {e}")
manager.close()
"""


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # for whom file modes count


def _save_step_2_elsewhere(workdir, how: str) -> str:
  """Runs `_SAVE_STEP_2` on `workdir` as nobody (`how="nobody"`) or inside `unshare -rm` with the workdir's
  checkpoints folder bind-mounted read-only (`how="ro_mount"`); its last output line."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # root's cache: not for nobody
  env.update(ONE_DEVICE, HOME=str(workdir))
  cmd = [sys.executable, "-c", _SAVE_STEP_2, str(workdir)]
  if how == "ro_mount":
    d = workdir / "checkpoints"
    cmd = ["unshare", "-rm", "sh", "-c", f'mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec "$@"', "sh",
           *cmd]
  else:
    cmd = AS_NOBODY + cmd
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout.strip().splitlines()[-1]


_FINDS_PACKAGES = "import importlib.util as u; assert u.find_spec('cvvae_jax.train') and u.find_spec('orbax')"


def _nobody_can_run_python(workdir) -> str | None:
  """None when a process running as nobody can start this Python and read the repository, else why not."""
  if shutil.which("setpriv") is None:
    return "no setpriv command on this machine"
  probe = subprocess.run(AS_NOBODY + [sys.executable, "-c", _FINDS_PACKAGES], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(workdir)}, timeout=120,
                         check=False)
  return None if probe.returncode == 0 else f"nobody cannot run {sys.executable} here: {probe.stderr.strip()[-300:]}"


def test_save_into_a_read_only_folder_is_one_clear_error(tmp_path):
  """The checkpoints folder made read-only (mode 555): as root, whom modes do not stop, the save runs as nobody in
  a subprocess (or, where that cannot run, inside `unshare -rm` on a read-only bind mount of the folder)."""
  if os.geteuid() != 0:
    _save(tmp_path, [1])
    os.chmod(tmp_path / "checkpoints", 0o555)
    manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False)
    try:
      with pytest.raises(checkpoint.CheckpointSaveError,
                         match=r"step 2 failed: permission denied .*the last good checkpoint is step 1"):
        manager.save(2, _state(2), checkpoint.make_meta(), force=True)
    finally:
      os.chmod(tmp_path / "checkpoints", 0o755)
      manager.close()
    return
  workdir = epath.Path(tempfile.mkdtemp(prefix="cvvae_ro_"))  # not under tmp_path: nobody must reach it
  try:
    _save(workdir, [1])
    os.chmod(workdir, 0o755)
    os.chown(workdir, 65534, 65534)  # nobody's home (HOME) and its workdir; the checkpoints folder stays root's
    os.chmod(workdir / "checkpoints", 0o555)
    why = _nobody_can_run_python(workdir)
    if why is None:
      line = _save_step_2_elsewhere(workdir, "nobody")
      want = r"step 2 failed: permission denied \(.*\); the last good checkpoint is step 1 in .*; make the workdir"
    elif _can_unshare() is None:
      line = _save_step_2_elsewhere(workdir, "ro_mount")
      want = r"step 2 failed: the file system is read-only \(.*\); the last good checkpoint is step 1 in .*; remount"
    else:
      pytest.skip(f"running as root, whom file modes do not stop, and neither works here: {why}; {_can_unshare()}")
    assert re.match(r"CheckpointSaveError: saving checkpoint " + want, line), line
    os.chmod(workdir / "checkpoints", 0o755)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
  finally:
    os.chmod(workdir / "checkpoints", 0o755)
    shutil.rmtree(workdir)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_failed_async_save_stops_at_the_next_step_check(tmp_path, monkeypatch):
  manager = checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=True)
  manager.save(1, _state(1), checkpoint.make_meta(), force=True)
  for _ in range(600):  # the async save's checksums are written once it has finished
    manager.check()
    if manager.is_committed(1) and (tmp_path / "checkpoints" / "1" / integrity.CHECKSUMS_FILE).exists():
      break
    time.sleep(0.05)
  assert integrity.verify_step(tmp_path / "checkpoints" / "1") is not None

  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")  # as the commit of a full disk reports it

  with monkeypatch.context() as m:  # the injected fault: the background commit of step 2 fails
    m.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", fail)
    assert manager.save(2, _state(2), checkpoint.make_meta(), force=True)  # returns while the commit runs
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"step 2 failed: no space left on the device .*the last good checkpoint is step 1"):
      for _ in range(600):  # the trainer calls check() once per step
        manager.check()
        time.sleep(0.05)
  assert manager.all_steps() == [1]
  manager.close()


def test_describe_fault_names_the_usual_save_faults():
  assert integrity.describe_fault(OSError(28, "No space left on device"))[0] == "no space left on the device"
  assert integrity.describe_fault(ValueError("RESOURCE_EXHAUSTED: writing x"))[0] == "no space left on the device"
  assert integrity.describe_fault(PermissionError(13, "Permission denied"))[0] == "permission denied"
  assert integrity.describe_fault(OSError(30, "Read-only file system"))[0] == "the file system is read-only"
  what, _, transient = integrity.describe_fault(ValueError("UNAVAILABLE: 503 backend"))
  assert what == "the storage is unavailable" and transient


@pytest.fixture
def outage(gcs_server, monkeypatch):
  """A `gcs_proxy.FaultyProxy` in front of the GCS server, with gcsfs (Orbax's metadata files, our checksums) and
  TensorStore (the array data) pointed at it; both libraries' own retries are kept but made quick (gcsfs: its 6
  tries, each backoff cut to 10 ms; TensorStore: 2 retries of 10-20 ms), so that an outage reaches the manager in
  milliseconds instead of after their minute of backoff. The manager's own backoff sleeps are recorded, not slept."""
  proxy = gcs_proxy.FaultyProxy(gcs_server.url)
  proxy.start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)     # gcsfs reads it per request
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)  # TensorStore per kvstore it opens
  sleep = asyncio.sleep
  monkeypatch.setattr(gcsfs_retry, "asyncio", types.SimpleNamespace(sleep=lambda s: sleep(min(s, 0.01))))
  monkeypatch.setitem(ts_utils._DEFAULT_OCDBT_TS_CONTEXT, "gcs_request_retries",
                      {"max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"})
  proxy.backoffs = []
  yield proxy
  proxy.fail_for(0)
  proxy.stop()


def _end_outage_at_backoff(proxy, n):
  """A stand-in for the manager's `time.sleep` that records each backoff and ends `proxy`'s outage at the `n`-th."""
  def sleep(seconds):
    proxy.backoffs.append(seconds)
    if len(proxy.backoffs) == n:
      proxy.fail_for(0)
  return types.SimpleNamespace(sleep=sleep)


def test_save_retries_through_a_storage_outage_and_a_persistent_one_is_one_clear_error(outage, gcs_server, caplog,
                                                                                        monkeypatch):
  workdir = gcs_server.bucket("outage") + "/run"
  manager = checkpoint.CheckpointManager(workdir, enable_async_checkpointing=False, retries=3, retry_delay_s=0.5)
  manager.save(1, _state(1), checkpoint.make_meta(), force=True)
  assert outage.forwarded > 0 and outage.failed == 0
  # Every request fails (503) from the save's start until the manager's second backoff: two attempts fail, each
  # after gcsfs / TensorStore gave up, and the third saves the step.
  monkeypatch.setattr(checkpoint, "time", _end_outage_at_backoff(outage, 2))
  caplog.set_level(logging.WARNING, logger=checkpoint.__name__)
  outage.fail_for(None)
  assert manager.save(2, _state(2), checkpoint.make_meta(data_state={"step": 2}), force=True)
  retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
  assert len(retried) == 2 and all(m.startswith("saving checkpoint step 2 failed (the storage is unavailable: ")
                                   for m in retried), retried
  assert outage.backoffs == [0.5, 1.0] and outage.failed > 0
  assert manager.all_steps() == [1, 2]
  assert integrity.verify_step(epath.Path(workdir) / "checkpoints" / "2") is not None
  state, meta = manager.restore(2, _abstract())
  np.testing.assert_array_equal(state["params"]["w"], np.full((64, 64), 2.0))
  assert meta["data"] == {"step": 2}
  assert outage.failed_agents.get("python-gcsfs") and "tensorstore" in outage.forwarded_agents
  # Only TensorStore's requests (the array data) fail, until the first backoff: the save fails inside TensorStore.
  outage.backoffs.clear()
  caplog.clear()
  monkeypatch.setattr(checkpoint, "time", _end_outage_at_backoff(outage, 1))
  outage.fail_for(None, only="tensorstore")
  assert manager.save(3, _state(3), checkpoint.make_meta(), force=True)
  retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
  assert len(retried) == 1 and "the storage is unavailable" in retried[0] and outage.failed_agents.get("tensorstore")
  assert manager.all_steps() == [1, 2, 3] and integrity.verify_step(epath.Path(workdir) / "checkpoints" / "3")
  # An outage that outlasts the retries: one line, after 3 retries, naming the step and the last good one.
  outage.backoffs.clear()
  monkeypatch.setattr(checkpoint, "time", _end_outage_at_backoff(outage, None))
  outage.fail_for(None)
  failed_before = outage.failed
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    manager.save(4, _state(4), checkpoint.make_meta(), force=True)
  assert outage.backoffs == [0.5, 1.0, 2.0] and outage.failed > failed_before
  message = str(error.value)
  assert "\n" not in message and message.startswith("saving checkpoint step 4 failed: the storage is unavailable (")
  assert f"the last good checkpoint is step 3 in {workdir}/checkpoints" in message
  assert message.endswith("check the bucket or network and run the same command again")
  outage.fail_for(0)
  manager.close()
  reader = checkpoint.CheckpointManager(workdir, read_only=True)
  assert reader.all_steps() == [1, 2, 3]
  reader.close()


def test_verify_reports_ok_corrupt_unverified_and_moved_aside(tmp_path, capsys):
  _save(tmp_path, [1, 2, 3, 4])
  ckpt = tmp_path / "checkpoints"
  os.remove(ckpt / "1" / integrity.CHECKSUMS_FILE)            # saved before checksums existed
  victim = _array_files(ckpt / "3")[0]
  size = os.path.getsize(victim)
  _truncate(victim)
  shutil.copytree(ckpt / "2", ckpt / "2.corrupt")
  rows = {r["name"]: r for r in verify.check_workdir(str(tmp_path))}
  assert rows["1"]["status"].startswith("unverified") and rows["1"]["restores"] is True
  assert rows["2"]["status"].startswith("ok (") and rows["2"]["restores"] is True
  assert rows["3"]["status"] == f"corrupt: {os.path.relpath(victim, ckpt / '3')}: 100 bytes, {size} bytes when saved " \
                                "(truncated or overwritten)"
  assert rows["3"]["restores"] is False and rows["3"]["error"]
  assert rows["2.corrupt"]["status"].startswith("moved aside") and rows["2.corrupt"]["restores"] is None
  assert rows["4"]["ok"] and all(r["size"] > 0 for r in rows.values())
  assert verify.main(["verify", str(tmp_path)]) == 0   # the newest step, 4, is good
  out = capsys.readouterr().out
  assert "corrupt: state/ocdbt.process_0/d/" in out and "newest good step: 4" in out
  _flip_byte(_array_files(ckpt / "4")[0])
  assert verify.main(["verify", str(tmp_path)]) == 1
  assert "newest good step: 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- slow: python train.py

LOSSES = ("loss/total", "loss/nll", "loss/kl", "disc/loss", "disc/logits_real")
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ROOT}


def _train_cmd(workdir, steps):
  """`python train.py` on the tiny config of tests/multihost_config.py (checkpoints every 2 steps, synchronous), 1
  CPU device."""
  return [sys.executable, "train.py", "--config", f"{CONFIG}:{steps}", "--workdir", str(workdir),
          "--config.mesh.data=1"]


def _train(workdir, steps=4):
  run = subprocess.run(_train_cmd(workdir, steps), cwd=ROOT, env={**os.environ, **ONE_DEVICE}, capture_output=True,
                       text=True, timeout=600, check=False)
  print(run.stderr[-3000:])  # shown on failure
  return run.returncode, run.stderr.splitlines()


def _history(workdir):
  return json.loads((epath.Path(workdir) / records.HISTORY_JSON).read_text())


def _losses(history):
  return {k: v for k, v in history.items() if k in LOSSES}


def _can_unshare() -> str | None:
  """None when `unshare -rm` can mount a tmpfs here, else why not."""
  if shutil.which("unshare") is None:
    return "no unshare command on this machine"
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                         capture_output=True, text=True, check=False)
  return None if probe.returncode == 0 else f"unshare -rm cannot mount a tmpfs here: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
  """`python train.py` (4 steps) in a workdir on a small tmpfs that fills during the save of step 4, then the same
  command after space was freed; inside `unshare -rm`, so no mount outlives it. The folder of its outputs
  (`full.log`/`.rc`, `after_full/`, `freed.log`/`.rc`, `after_freed/`: the workdir after each run), or the reason
  why it cannot run here (a str)."""
  why = _can_unshare()
  if why:
    return why
  d = tmp_path_factory.mktemp("full_disk")
  mnt, out = d / "mnt", d / "out"
  mnt.mkdir()
  out.mkdir()
  run = " ".join(_train_cmd(mnt / "run", 4))
  # 36 MB with 16 MB taken: step 2 (about 11 MB) fits, step 4 (about 15 MB more) does not; then the 16 MB are freed.
  script = f"""
    mount -t tmpfs -o size=36m tmpfs {mnt} || exit 90
    head -c 16000000 /dev/zero > {mnt}/filler
    {run} > {out}/full.log 2>&1; echo $? > {out}/full.rc
    cp -r {mnt}/run {out}/after_full
    rm {mnt}/filler
    {run} > {out}/freed.log 2>&1; echo $? > {out}/freed.rc
    cp -r {mnt}/run {out}/after_freed
  """
  subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env={**os.environ, **ONE_DEVICE}, timeout=900,
                 check=True)
  return out


@pytest.fixture(scope="module")
def trained(full_disk, tmp_path_factory):
  """A workdir written by `python train.py` (4 steps) with checkpoints 2 and 4 and its history: the full-disk run's
  once space was freed (steps 3 and 4 ran again from step 2 there), which saves a run of its own, or, where that
  could not run or did not finish, a plain 4-step run."""
  if not isinstance(full_disk, str) and (full_disk / "freed.rc").read_text().strip() == "0":
    return full_disk / "after_freed"
  workdir = tmp_path_factory.mktemp("trained") / "run"
  rc, _ = _train(workdir)
  assert rc == 0
  return workdir


def _fallback_case(trained, workdir, copy):
  """`copy(trained, workdir)`, truncates the largest array file of step 4, runs the same command again."""
  before = _history(trained)
  copy(trained, workdir)
  step4 = epath.Path(workdir) / "checkpoints" / "4"
  victim = _array_files(step4)[0]
  rel = os.path.relpath(victim, os.fspath(step4))
  _truncate(victim, 1000)
  rc, lines = _train(workdir)
  assert rc == 0
  assert any("skipped checkpoint step 4" in line and rel in line and "moved it aside" in line for line in lines)
  assert any("resumed from" in line and "at step 2" in line for line in lines)
  after = _history(workdir)
  # Steps 3 and 4 ran again from step 2: the losses the copied run had, bit for bit, each step once.
  assert _losses(after) == _losses(before) and [s for s, _ in after["loss/total"]] == [1, 3]
  (event,) = after[records.CHECKPOINT_FALLBACK]
  assert event[0] == 2 and [(e["step"], e["moved_to"]) for e in event[1]] == [(4, "4.corrupt")]
  assert rel in event[1][0]["error"] and "1000 bytes" in event[1][0]["error"]
  names = sorted(p.name for p in (epath.Path(workdir) / "checkpoints").iterdir())
  assert names == ["2", "4", "4.corrupt"]
  rows = {r["name"]: r for r in verify.check_workdir(str(workdir))}
  assert rows["4"]["ok"] and rows["4"]["restores"] and rows["2"]["ok"]
  assert rows["4.corrupt"]["status"].startswith("moved aside")
  assert integrity.verify_step(epath.Path(workdir) / "checkpoints" / "4") is not None
  with pytest.raises(integrity.CheckpointIntegrityError, match=rel):
    integrity.verify_step(epath.Path(workdir) / "checkpoints" / "4.corrupt")


def _upload(gcs_server, bucket):
  def copy(src, dst):
    prefix = dst[len(f"gs://{bucket}/"):]
    for d, _, names in os.walk(src):
      for n in names:
        path = os.path.join(d, n)
        with open(path, "rb") as f:
          gcs_server.upload(bucket, f"{prefix}/{os.path.relpath(path, src)}", f.read())
  return copy


@pytest.mark.slow
def test_train_py_falls_back_past_a_truncated_latest_step(trained, tmp_path):
  _fallback_case(trained, tmp_path / "run", shutil.copytree)


@pytest.mark.slow
def test_train_py_on_gcs_falls_back_past_a_truncated_latest_step(trained, gcs_server):
  """The same on a copy of the workdir on the GCS server: the restart reads, moves aside and saves on gs://."""
  _fallback_case(trained, gcs_server.bucket("faults") + "/run", _upload(gcs_server, "faults"))
  assert "run/checkpoints/4.corrupt/commit_success.txt" in gcs_server.objects("faults", "run/")


@pytest.mark.slow
def test_train_py_on_a_full_disk_stops_with_one_line_and_resumes_after_space_is_freed(full_disk):
  if isinstance(full_disk, str):
    pytest.skip(full_disk)
  out = full_disk
  full = (out / "full.log").read_text().splitlines()
  print("\n".join(full[-40:]))
  assert (out / "full.rc").read_text().strip() == "1"
  errors = [line for line in full if line.startswith("error: ")]
  assert len(errors) == 1, errors
  assert errors[0].startswith("error: saving checkpoint step 4 failed: no space left on the device")
  assert "the last good checkpoint is step 2 in" in errors[0] and "run the same command again" in errors[0]
  assert sum(line.startswith("Traceback") for line in full) <= 1
  assert not any("Event loop is closed" in line for line in full)
  rows = {r["name"]: r for r in verify.check_workdir(str(out / "after_full"))}
  assert rows["2"]["ok"] and rows["2"]["restores"] and "4" not in rows
  freed = (out / "freed.log").read_text().splitlines()
  assert (out / "freed.rc").read_text().strip() == "0", "\n".join(freed[-40:])
  assert any("resumed from" in line and "at step 2" in line for line in freed)
  assert sorted(os.listdir(out / "after_freed" / "checkpoints")) == ["2", "4"]
  assert [s for s, _ in _history(out / "after_freed")["loss/total"]] == [1, 3]
