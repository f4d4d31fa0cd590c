"""Training checkpoints: a thin layer over `orbax.checkpoint.CheckpointManager` (as MaxText's `checkpointing.py`).

The layout is the workdir's (`weights/workdir.py`, which also reads it for `load_pretrained`):
`<workdir>/checkpoints/<step>/` with two items,
  * `state`: any pytree of arrays (the `TrainState` of params, optimizer states, EMA params, step, ...), saved
    sharded by every process and restored onto the shardings of an abstract state, so a run saved on one mesh
    resumes on another mesh or device count (resharding);
  * `meta`: JSON (`make_meta`): the model spec, the config as a dict, the data iterator's position, versions.

Crash safety (Orbax): a step is written under `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only
once complete (with a `commit_success.txt` inside; object stores use the commit file alone). Old steps beyond
`max_to_keep` are deleted only after the new one is committed. So a process killed mid-write, or an
exception in a save, leaves the last good checkpoint in place; temporary directories of killed runs are
removed when the next manager starts, and `latest_step` / `restore_latest` only see committed steps (a
step directory without its commit file is skipped with a warning). After a failed save the manager
re-reads the step list from disk, so it never reports the failed step.

Faults (`integrity.py`): each committed step gets `checksums.json` (crc32c of every file); `restore_latest`
verifies it and falls back past damaged steps, moving them aside to `<step>.corrupt`; the step it restored is
never deleted by keep-N; a failed save raises `CheckpointSaveError`, one line naming the step, the last good
checkpoint and what to do (transient storage errors are retried with backoff first; an async save's failure
surfaces at the next `check()`, called once per step).

    manager = checkpoint.CheckpointManager.from_config(workdir, config.train)
    reached = checkpoint.install_preemption_handler()
    restored = manager.restore_latest(sharding.with_shardings(abstract_state, state_shardings))
    state, _ = restored if restored else (init_state(), None)
    meta = checkpoint.make_meta(model=vae, config=config)
    for step in range(start, total):
      state, metrics = train_step(state, batch, rng)
      manager.check()                             # raises an async save's failure at the next step
      preempted = reached(step + 1)               # SIGTERM (or the multi-host preemption sync point)
      if manager.should_save(step + 1) or preempted:
        manager.save(step + 1, state, {**meta, "data": {"step": step + 1}}, force=True)
      if preempted:
        break
    manager.close()                               # waits for an async save to finish

Restoring is strict about the tree structure and shapes (Orbax raises on any difference); arrays are cast to
the dtypes of the abstract state.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cvvae_jax import paths, utils
from cvvae_jax.models import registry
from cvvae_jax.train import integrity
from cvvae_jax.weights import workdir as workdir_lib
from cvvae_jax.weights.workdir import STATE, META, CheckpointReader

log = logging.getLogger(__name__)


def make_meta(*, model=None, config=None, data_state: Mapping[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
  """The JSON `meta` item: `{"model": spec, "config": dict, "data": data_state, "versions": {...}, **extra}`.

  `model` is a `CVVAE`/`ImageVAE` module or its spec dict (`registry.model_spec`); `config` a ConfigDict
  or dict (non-JSON values such as dtypes are stored as strings).
  """
  meta: dict[str, Any] = {"versions": utils.versions()}
  if model is not None:
    meta["model"] = model if isinstance(model, Mapping) else registry.model_spec(model)
  if config is not None:
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      meta["config"] = json.loads(config.to_json_best_effort())
    else:
      meta["config"] = json.loads(json.dumps(config, default=str))
  if data_state is not None:
    meta["data"] = dict(data_state)
  meta.update(extra)
  _check_json(meta)
  return meta


def _check_json(meta: Any) -> None:
  if not isinstance(meta, Mapping):
    raise TypeError(f"expected meta to be a dict (a JSON object), got {type(meta).__name__}")
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise TypeError(f"expected meta to be JSON-serializable (ints, floats, strings, lists, dicts): {e}") from e


def _abstract_with_shardings(abstract_state: Any) -> Any:
  """Leaves -> `ShapeDtypeStruct(shape, dtype, sharding)`; raises listing the leaves that lack a sharding."""
  missing = []

  def convert_leaf(path, leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      missing.append(jax.tree_util.keystr(path, simple=True, separator="/") or "<root>")
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  out = jax.tree_util.tree_map_with_path(convert_leaf, abstract_state)
  if missing:
    raise ValueError(f"expected every leaf of abstract_state to be a jax.ShapeDtypeStruct (or array) with a "
                     f".sharding, e.g. sharding.with_shardings(jax.eval_shape(init), shardings); "
                     f"{len(missing)} leaves have none: {missing[:10]}")
  return out


class CheckpointSaveError(OSError):
  """A save that failed: one line saying what failed, at which step, the last good checkpoint and what to do."""


class CheckpointRestoreError(ValueError):
  """No committed step of a workdir restores; the message lists each step and its error."""


class _Protected(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the steps in `steps` (a set the manager updates: the step this run restored)."""

  def __init__(self):
    self.steps: set[int] = set()

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


class CheckpointManager(CheckpointReader):
  """Saves and restores `(state, meta)` under `<workdir>/checkpoints`. All processes call every method.

  `manager` is the underlying `orbax.checkpoint.CheckpointManager` (items `state`: PyTree, `meta`: JSON). Each
  committed step gets its checksums (`integrity.write_checksums`); `restore_latest` verifies them (unless
  `verify=False`) and falls back to older steps, moving damaged ones aside (`skipped` says which and why). A save that
  fails raises `CheckpointSaveError` (transient storage errors are retried `retries` times with backoff first).
  """

  def __init__(self, workdir: str, *, save_interval_steps: int = 1, max_to_keep: int | None = None,
               enable_async_checkpointing: bool = True, read_only: bool = False, verify: bool = True,
               retries: int = 3, retry_delay_s: float = 2.0):
    if save_interval_steps < 1:
      raise ValueError(f"expected checkpoint.save_interval_steps >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"expected checkpoint.max_to_keep >= 1 or None (keep all), got {max_to_keep}")
    policies = ocp.checkpoint_managers
    self._protected = _Protected()  # keep-N never deletes the step this run restored
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                                     policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(max_to_keep), self._protected]),
        enable_async_checkpointing=enable_async_checkpointing,
        cleanup_tmp_directories=not read_only,  # leftovers of killed saves
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # superseded by save_decision_policy; 0 when read-only
    )
    super().__init__(workdir, options)
    integrity.drop_closed_loop_callbacks()  # the tracebacks of a failed save's late TensorStore callbacks
    self.verify, self.retries, self.retry_delay_s = bool(verify), int(retries), float(retry_delay_s)
    self._async = bool(enable_async_checkpointing)
    self.restored_step: int | None = None
    self.skipped: list[dict[str, Any]] = []  # steps restore_latest could not restore: {step, error, moved_to}
    self._closed = False
    self._pending: int | None = None  # a saved step whose checksums are not written yet (async in flight)

  @classmethod
  def from_config(cls, workdir: str, train: ml_collections.ConfigDict, **kwargs) -> "CheckpointManager":
    """The trainer's manager from `config.train`: checkpoint_every_steps, keep_checkpoints, async_checkpoints,
    verify_checkpoints."""
    return cls(workdir, save_interval_steps=train.checkpoint_every_steps, max_to_keep=train.keep_checkpoints,
               enable_async_checkpointing=train.async_checkpoints, verify=train.get("verify_checkpoints", True),
               **kwargs)

  # -------------------------------------------------------------------------------------------- steps

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` (without force) would write: on the interval, or at a preemption."""
    return self.manager.should_save(int(step))

  def step_dir(self, step: int):
    return ocp.path.step.build_step_path(self.directory, ocp.path.step.standard_name_format(), int(step))

  def last_good_step(self) -> int | None:
    """The newest committed step, not counting one whose save is in flight."""
    steps = [s for s in self.all_steps() if s != self._pending]
    return steps[-1] if steps else None

  # ------------------------------------------------------------------------------------------- saving

  def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) at `step` if due (or `force`). Returns whether a
    save started; False also when `step` is already saved. Async: returns after the device->host copy; its
    failure surfaces at the next `check`, `save` or `wait_until_finished`."""
    step = int(step)
    _check_json(meta)
    self.wait_until_finished()
    if step in self.manager.all_steps():
      if step in self.all_steps():
        return False  # already saved (e.g. a final forced save right after a periodic one)
      raise ValueError(f"checkpoint directory of step {step} in {self.directory} exists but was never "
                       f"committed (no {workdir_lib.COMMIT_FILE}); move it away to save this step again")
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(dict(meta))})
    for attempt in range(self.retries + 1):
      try:
        if attempt:
          self._remove_partial(step)  # on the storage that just failed: inside the retries
        started = self.manager.save(step, args=args, force=force)
        break
      except Exception as e:  # pylint: disable=broad-except
        self._recover()
        what, _, transient = integrity.describe_fault(e)
        if not transient or attempt == self.retries:
          raise self._save_error(step, e) from e
        delay = self.retry_delay_s * 2 ** attempt
        log.warning("saving checkpoint step %d failed (%s: %s); retrying in %.1f s (%d/%d)", step, what,
                    integrity.first_line(e), delay, attempt + 1, self.retries)
        time.sleep(delay)
    if started:
      self._pending = step
      if not self._async:
        self.wait_until_finished()
    return started

  def check(self) -> None:
    """Call once per step: when an async save has finished, writes its checksums, or raises its failure. With
    several processes it does nothing (each would see its own save finish at another step, and the checksums are
    followed by a barrier): there, a failure surfaces at the next `save` or at `close`."""
    if self._pending is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self.wait_until_finished()

  def wait_until_finished(self) -> None:
    """Blocks until an async save is committed and its checksums written; raises `CheckpointSaveError` when it
    failed (the previous checkpoint stays)."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      if step is not None and jax.process_index() == 0:
        integrity.write_checksums(self.step_dir(step))
    except Exception as e:  # pylint: disable=broad-except
      self._recover()
      raise self._save_error(step, e) from e
    finally:
      if step is not None and jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"cvvae_checksums_{step}")

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    integrity.save_failed()
    what, todo, _ = integrity.describe_fault(error)
    try:
      good = self.last_good_step()
    except Exception:  # pylint: disable=broad-except  # the storage is down: the newest step known committed
      good = max((s for s in self.manager.all_steps() if s not in (step, self._pending)), default=None)
    last = (f"the last good checkpoint is step {good} in {self.directory} (a restart resumes from it)"
            if good is not None else f"no checkpoint was saved yet in {self.directory}")
    return CheckpointSaveError(f"saving checkpoint step {step} failed: {what} ({integrity.first_line(error, 160)}); "
                               f"{last}; {todo}")

  def _remove_partial(self, step: int) -> None:
    """Before retrying a save: the step's uncommitted folders (tmp or, on object stores, the final name)."""
    if jax.process_index() == 0:
      for p in self.directory.glob(f"{step}*"):
        if p.name == str(step) and not self.is_committed(step) or p.name.startswith(f"{step}.orbax-checkpoint-tmp"):
          p.rmtree(missing_ok=True)
    paths.refresh(self.directory)

  def _recover(self) -> None:
    """After a failed save: Orbax has already listed the failed step (and dropped the steps it meant to
    delete on success); re-read the committed steps from disk."""
    try:
      self.manager.reload()
    except Exception as e:  # pylint: disable=broad-except
      log.warning("could not re-read the checkpoint steps in %s: %s", self.directory, integrity.first_line(e))

  # ---------------------------------------------------------------------------------------- restoring

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """`(state, meta)` of `step`, arrays placed on the shardings carried by `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `.sharding`, of the saved structure). Nothing is verified (`restore_latest` is)."""
    target = _abstract_with_shardings(abstract_state)
    args = ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        META: ocp.args.JsonRestore()})
    restored = self.manager.restore(int(step), args=args)
    return restored[STATE], restored[META]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """`(state, meta)` of the newest committed step that verifies (`verify`) and restores, or None when no
    committed checkpoint exists.

    A step that fails its checksums, or fails to read while unverified (no checksums, or `verify=False`), is
    logged and, once an older step has restored, moved aside (`<step>.corrupt`; `skipped` lists them). A step whose
    files verify but which does not restore into `abstract_state` is not damage (another model or config): that
    error is raised. When no step restores, nothing is moved and `CheckpointRestoreError` lists each step's error.
    """
    self.wait_until_finished()
    paths.refresh(self.directory)
    self.manager.reload()
    failed = []
    for step in reversed(self.all_steps()):
      verified = None
      try:
        if self.verify:
          verified = integrity.verify_step(self.step_dir(step))
          if verified is None:
            log.warning("checkpoint step %d in %s has no %s: restoring it unverified", step, self.directory,
                        integrity.CHECKSUMS_FILE)
        restored = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        if verified is not None:
          raise ValueError(f"checkpoint step {step} in {self.directory} passed its checksums but does not restore "
                           f"into this run's state (another model or config?): {e}") from e
        log.error("checkpoint step %d in %s cannot be restored: %s", step, self.directory, integrity.first_line(e))
        failed.append((step, e))
        continue
      self._settle(step, failed)
      return restored
    if failed:
      raise CheckpointRestoreError(f"no checkpoint in {self.directory} restores (nothing was moved): " + "; ".join(
          f"step {s}: {integrity.first_line(e)}" for s, e in failed))
    return None

  def _settle(self, step: int, failed: list[tuple[int, BaseException]]) -> None:
    """After restoring `step`: the newer steps that failed are moved aside (process 0), `step` is protected."""
    self.skipped = []
    for bad, error in failed:
      where = self.step_dir(bad)
      moved = integrity.move_aside(where) if jax.process_index() == 0 else where.with_name(where.name + ".corrupt")
      self.skipped.append({"step": bad, "error": integrity.first_line(error), "moved_to": moved.name})
      log.warning("skipped checkpoint step %d (%s): moved it aside to %s; resuming from step %d", bad,
                  integrity.first_line(error), moved, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("cvvae_checkpoint_fallback")
    if failed:
      paths.refresh(self.directory)
      self.manager.reload()
    self.restored_step = step
    self._protected.steps = {step}

  def close(self) -> None:
    """Waits for an async save (raising its failure), then releases Orbax's threads (once)."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
    finally:
      self._closed = True
      self.manager.close()


# ---------------------------------------------------------------------------------------------- preemption


class PreemptionHandler:
  """`reached(step)`: True once the job is being preempted, at the same step on every process.

  One process: a SIGTERM (the usual preemption notice) handler sets a flag; `reached` reads it.
  Several processes: the flag of one host is not enough (every host must save the same step), so
  `reached(step)` is `jax.experimental.multihost_utils.reached_preemption_sync_point(step)` (JAX's
  preemption service, on by default after `jax.distributed.initialize`; it listens for SIGTERM itself, so
  no Python handler is installed). Call it at every step on all processes.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess:
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)  # raises outside the main thread

  def _on_signal(self, signum, frame) -> None:
    del frame
    log.warning("received signal %d: will save a checkpoint and stop at the next step", signum)
    self._event.set()

  def __call__(self, step: int | None = None) -> bool:
    if self.multiprocess:
      if step is None:
        raise ValueError("expected the current step: with several processes, reached(step) syncs them")
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._event.is_set()

  def uninstall(self) -> None:
    """Restores the previous signal handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}


def install_preemption_handler(signals: Sequence[int] = (signal.SIGTERM,)) -> PreemptionHandler:
  """Installs the handler (from the main thread) and returns `reached(step=None) -> bool`."""
  return PreemptionHandler(signals)
