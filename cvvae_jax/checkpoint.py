"""Training checkpoints: a thin layer over `orbax.checkpoint.CheckpointManager` (as MaxText's `checkpointing.py`).

Layout: `<workdir>/checkpoints/<step>/` with two items,
  * `state`: any pytree of arrays (a TrainState dataclass of params, optimizer states, EMA params, step,
    typed PRNG keys, ...), saved sharded by every process and restored onto the shardings of an abstract
    state, so a run saved on one mesh resumes on another mesh or device count (resharding);
  * `meta`: JSON (`make_meta`): the model spec (`pretrained.model_spec`), the config as a dict, the data
    iterator's position, library versions.

Crash safety (Orbax): a step is written under `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only
once complete (with a `commit_success.txt` inside; object stores use the commit file alone). Old steps beyond
`max_to_keep` are deleted only after the new one is committed. So a process killed mid-write, or an
exception in a save, leaves the last good checkpoint in place; temporary directories of killed runs are
removed when the next manager starts, and `latest_step` / `restore_latest` only see committed steps (a
step directory without its commit file is skipped with a warning). After a failed save the manager
re-reads the step list from disk, so it never reports the failed step.

    ckpt = checkpoint.CheckpointManager.from_config(workdir, config.checkpoint)
    reached = checkpoint.install_preemption_handler()
    restored = ckpt.restore_latest(sharding.with_shardings(abstract_state, state_shardings))
    state, meta = restored if restored else (init_state(), None)
    for step in range(start, total):
      state, metrics = train_step(state, batch, rng)
      meta = checkpoint.make_meta(model=vae, config=config, data_state={"step": step + 1})
      preempted = reached(step + 1)               # SIGTERM (or the multi-host preemption sync point)
      ckpt.save(step + 1, state, meta, force=preempted)   # on the interval, or now when preempted
      if preempted:
        break
    ckpt.close()                                  # waits for an async save to finish

Restoring is strict about the tree structure and shapes (Orbax raises on any difference); arrays are cast to
the dtypes of the abstract state.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from cvvae_jax import convert, pretrained

CHECKPOINTS_DIR = pretrained.CHECKPOINTS_DIR  # "checkpoints", inside a training workdir
STATE, META = "state", "meta"
PARAMS_PATH = ("params", "vae")  # where the trainer's state keeps the CV-VAE params
EMA_PATH = ("ema_params", "vae")
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE

log = logging.getLogger(__name__)


def checkpoint_config() -> ml_collections.ConfigDict:
  """Defaults of `config.checkpoint`.

  Fields:
    save_interval_steps: save when `step % save_interval_steps == 0` (and on preemption, and on `force`).
    max_to_keep: keep the newest N checkpoints (None: keep all).
    enable_async_checkpointing: write in a background thread; training continues once arrays are copied
      to host memory. Call `close()` / `wait_until_finished()` before the process exits.
  """
  return ml_collections.ConfigDict(dict(save_interval_steps=1000, max_to_keep=3, enable_async_checkpointing=True))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`; local paths made absolute, object-store paths (`gs://...`) kept as they are."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / CHECKPOINTS_DIR


def versions() -> dict[str, str]:
  """Installed versions of the libraries a checkpoint depends on."""
  out = {}
  for name in VERSIONED_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def make_meta(*, model=None, config=None, data_state: Mapping[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
  """The JSON `meta` item: `{"model": spec, "config": dict, "data": data_state, "versions": {...}, **extra}`.

  `model` is a `CVVAE`/`ImageVAE` module or its spec dict (`pretrained.model_spec`); `config` a ConfigDict
  or dict (non-JSON values such as dtypes are stored as strings).
  """
  meta: dict[str, Any] = {"versions": versions()}
  if model is not None:
    meta["model"] = model if isinstance(model, Mapping) else pretrained.model_spec(model)
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


class CheckpointManager:
  """Saves and restores `(state, meta)` under `<workdir>/checkpoints`. All processes call every method.

  `manager` is the underlying `orbax.checkpoint.CheckpointManager` (items `state`: PyTree, `meta`: JSON).
  """

  def __init__(self, workdir: str, *, save_interval_steps: int = 1, max_to_keep: int | None = None,
               enable_async_checkpointing: bool = True, read_only: bool = False):
    if save_interval_steps < 1:
      raise ValueError(f"expected checkpoint.save_interval_steps >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"expected checkpoint.max_to_keep >= 1 or None (keep all), got {max_to_keep}")
    self.directory = checkpoint_dir(workdir)
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
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, workdir: str, cfg: ml_collections.ConfigDict, **kwargs) -> "CheckpointManager":
    """From `config.checkpoint` (see `checkpoint_config`)."""
    return cls(workdir, save_interval_steps=cfg.save_interval_steps, max_to_keep=cfg.max_to_keep,
               enable_async_checkpointing=cfg.enable_async_checkpointing, **kwargs)

  # -------------------------------------------------------------------------------------------- steps

  def _is_committed(self, step: int) -> bool:
    path = ocp.path.step.build_step_path(self.directory, ocp.path.step.standard_name_format(), step)
    return (path / _COMMIT_FILE).exists()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (an async save in flight counts once `save` has returned)."""
    in_flight = self.manager.is_saving_in_progress()
    steps = []
    for step in self.manager.all_steps():
      if self._is_committed(step) or (in_flight and step == self.manager.latest_step()):
        steps.append(step)
      else:
        log.warning("checkpoint step %d in %s has no %s (an incomplete write); skipping it", step,
                    self.directory, _COMMIT_FILE)
    return steps

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

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
                       f"committed (no {_COMMIT_FILE}); move it away to save this step again")
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
    self.manager.reload()
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)

  def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The `meta` item of `step` (default: the latest), or None when no checkpoint exists."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def state_metadata(self, step: int) -> Any:
    """The saved `state` tree of `step` as nested dicts of Orbax metadata (shape, dtype), nothing loaded."""
    return self.manager.item_metadata(int(step))[STATE].tree

  def close(self) -> None:
    """Waits for an async save, then releases Orbax's threads."""
    try:
      self.wait_until_finished()
    finally:
      self.manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
      from jax.experimental import multihost_utils

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


# ------------------------------------------------------------------------------------------- model loading


def _subtree(tree: Any, path: Sequence[str]) -> Any | None:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def load_model_from_workdir(workdir: str, *, ema: bool | None = None, step: int | None = None,
                            params_path: Sequence[str] = PARAMS_PATH, ema_path: Sequence[str] = EMA_PATH,
                            **overrides):
  """`(model, params)` of a training workdir's checkpoint (default: the latest), without the optimizer.

  The model comes from the checkpoint's `meta["model"]` spec (`pretrained.model_from_spec(spec,
  **overrides)`); only the params subtree at `params_path` in the saved state is read (Orbax partial
  restore), or its EMA copy at `ema_path`: `ema=None` takes the EMA copy when the checkpoint has one,
  `ema=True` requires it, `ema=False` takes the raw params. Strict: every parameter of the model must be in
  the checkpoint with its shape and nothing else may be there (`convert.ConversionError` lists all).
  Params are placed on this process's first device, with the model's `param_dtype`.
  """
  if not checkpoint_dir(workdir).is_dir():
    raise FileNotFoundError(f"expected a training workdir with {CHECKPOINTS_DIR}/, got {os.fspath(workdir)}")
  ckpt = CheckpointManager(workdir, read_only=True, enable_async_checkpointing=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {ckpt.directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"expected step to be one of the committed steps {steps}, got {step}")
    meta = ckpt.restore_meta(step)
    if "model" not in meta:
      raise ValueError(f"checkpoint {ckpt.directory}/{step}: expected meta['model'] (the model spec, see "
                       f"checkpoint.make_meta(model=...)), got meta keys {sorted(meta)}")
    model = pretrained.model_from_spec(meta["model"], **overrides)

    saved_tree = ckpt.state_metadata(step)
    has_ema = _subtree(saved_tree, ema_path) is not None
    if ema is None:
      ema = has_ema
    if ema and not has_ema:
      raise ValueError(f"checkpoint {ckpt.directory}/{step} has no EMA params at {'/'.join(ema_path)} "
                       f"(ema=True); top-level state keys: {sorted(saved_tree)}")
    path = tuple(ema_path if ema else params_path)
    saved = _subtree(saved_tree, path)
    if saved is None:
      raise ValueError(f"checkpoint {ckpt.directory}/{step} has no params at {'/'.join(path)}; top-level "
                       f"state keys: {sorted(saved_tree) if isinstance(saved_tree, Mapping) else saved_tree}")

    expected = convert.init_shapes(model)
    found = traverse_util.flatten_dict(saved, sep="/") if isinstance(saved, Mapping) else {}
    problems = {
        "missing in the checkpoint": [k for k in expected if k not in found],
        "unexpected in the checkpoint (not in the model)": [k for k in found if k not in expected],
        "shape mismatches (checkpoint vs model)": [
            f"{k}: {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
            if k in found and tuple(getattr(found[k], "shape", ())) != tuple(expected[k].shape)],
    }
    lines = [f"{t} ({len(v)}):\n" + "\n".join(f"  {x}" for x in sorted(v)) for t, v in problems.items() if v]
    if lines:
      raise convert.ConversionError(f"params at {'/'.join(path)} of {ckpt.directory}/{step} do not fit "
                                    f"{meta['model'].get('class')}:\n" + "\n".join(lines))

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in expected.items()}, sep="/")
    target = abstract
    for key in reversed(path):
      target = {key: target}
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)}))
    params = _subtree(restored[STATE], path)
  finally:
    ckpt.manager.close()
  return model, params
