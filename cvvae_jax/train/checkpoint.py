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

    manager = checkpoint.CheckpointManager.from_config(workdir, config.train)
    reached = checkpoint.install_preemption_handler()
    restored = manager.restore_latest(sharding.with_shardings(abstract_state, state_shardings))
    state, _ = restored if restored else (init_state(), None)
    meta = checkpoint.make_meta(model=vae, config=config)
    for step in range(start, total):
      state, metrics = train_step(state, batch, rng)
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
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cvvae_jax import paths, utils
from cvvae_jax.models import registry
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


class CheckpointManager(CheckpointReader):
  """Saves and restores `(state, meta)` under `<workdir>/checkpoints`. All processes call every method.

  `manager` is the underlying `orbax.checkpoint.CheckpointManager` (items `state`: PyTree, `meta`: JSON).
  """

  def __init__(self, workdir: str, *, save_interval_steps: int = 1, max_to_keep: int | None = None,
               enable_async_checkpointing: bool = True, read_only: bool = False):
    if save_interval_steps < 1:
      raise ValueError(f"expected checkpoint.save_interval_steps >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"expected checkpoint.max_to_keep >= 1 or None (keep all), got {max_to_keep}")
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                                     policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=enable_async_checkpointing,
        cleanup_tmp_directories=not read_only,  # leftovers of killed saves
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # superseded by save_decision_policy; 0 when read-only
    )
    super().__init__(workdir, options)

  @classmethod
  def from_config(cls, workdir: str, train: ml_collections.ConfigDict, **kwargs) -> "CheckpointManager":
    """The trainer's manager from `config.train`: checkpoint_every_steps, keep_checkpoints, async_checkpoints."""
    return cls(workdir, save_interval_steps=train.checkpoint_every_steps, max_to_keep=train.keep_checkpoints,
               enable_async_checkpointing=train.async_checkpoints, **kwargs)

  # -------------------------------------------------------------------------------------------- steps

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` (without force) would write: on the interval, or at a preemption."""
    return self.manager.should_save(int(step))

  # ------------------------------------------------------------------------------------------- saving

  def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) at `step` if due (or `force`). Returns whether a
    save started; False also when `step` is already saved. Async: returns after the device->host copy."""
    step = int(step)
    _check_json(meta)
    if step in self.manager.all_steps():
      if step in self.all_steps():
        return False  # already saved (e.g. a final forced save right after a periodic one)
      raise ValueError(f"checkpoint directory of step {step} in {self.directory} exists but was never "
                       f"committed (no {workdir_lib.COMMIT_FILE}); move it away to save this step again")
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(dict(meta))})
    try:
      return self.manager.save(step, args=args, force=force)
    except BaseException:
      self._recover()
      raise

  def wait_until_finished(self) -> None:
    """Blocks until an async save is committed; re-raises its error (the previous checkpoint stays)."""
    try:
      self.manager.wait_until_finished()
    except BaseException:
      self._recover()
      raise

  def _recover(self) -> None:
    """After a failed save: Orbax has already listed the failed step (and dropped the steps it meant to
    delete on success); re-read the committed steps from disk."""
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      log.exception("could not re-read the checkpoint steps in %s", self.directory)

  # ---------------------------------------------------------------------------------------- restoring

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """`(state, meta)` of `step`, arrays placed on the shardings carried by `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `.sharding`, of the saved structure)."""
    target = _abstract_with_shardings(abstract_state)
    args = ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        META: ocp.args.JsonRestore()})
    restored = self.manager.restore(int(step), args=args)
    return restored[STATE], restored[META]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """`restore(latest_step(), abstract_state)`, or None when no committed checkpoint exists."""
    self.wait_until_finished()
    paths.refresh(self.directory)
    self.manager.reload()
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)

  def close(self) -> None:
    """Waits for an async save, then releases Orbax's threads."""
    try:
      self.wait_until_finished()
    finally:
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
