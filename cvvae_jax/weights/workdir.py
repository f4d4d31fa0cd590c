"""A training workdir as a model source: its checkpoint layout, its committed steps, and its params read-only.

Layout (written by `train/checkpoint.py`): `<workdir>/checkpoints/<step>/` holds two Orbax items,
  * `state`: the train state pytree (params under `params/vae`, their EMA under `ema_params/vae`, optimizer states,
    step, ...);
  * `meta`: JSON: the model spec (`models.registry.model_spec`), the config as a dict, the data position, versions.
A step counts once committed: Orbax writes it under a temporary name and renames it when complete, with a
`commit_success.txt` inside (object stores have the commit file alone); a step directory without one is an
incomplete write and is skipped with a warning.

    vae, params = load_model_from_workdir(workdir)           # the latest step; EMA params when it has them
    meta = read_meta(workdir)                                # the latest step's meta, or None
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from cvvae_jax import paths
from cvvae_jax.models import registry
from cvvae_jax.weights.convert import ConversionError

CHECKPOINTS_DIR = "checkpoints"
STATE, META = "state", "meta"
PARAMS_PATH = ("params", "vae")  # where the trainer's state keeps the trained VAE's params
EMA_PATH = ("ema_params", "vae")
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`; local paths made absolute, object-store paths (`gs://...`) kept as they are."""
  return paths.path(workdir) / CHECKPOINTS_DIR


def is_workdir(path: str | os.PathLike) -> bool:
  return checkpoint_dir(path).is_dir()


class CheckpointReader:
  """The committed checkpoints of a workdir. `manager` is the underlying `orbax.checkpoint.CheckpointManager`
  (items `state`: PyTree, `meta`: JSON); read-only unless `options` say otherwise (the trainer's subclass)."""

  def __init__(self, workdir: str | os.PathLike, options: ocp.CheckpointManagerOptions | None = None):
    self.directory = checkpoint_dir(workdir)
    paths.refresh(self.directory)  # on a bucket, list the steps as they are now (other processes may have saved)
    if options is None:
      # A reader never saves nor deletes: nothing is created, no leftovers cleaned, no save is ever due. (Orbax's
      # `read_only=True` would only add guards on save/delete, which a reader has not, and a warning per load.)
      options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False, save_interval_steps=0,
                                             enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})

  def is_committed(self, step: int) -> bool:
    path = ocp.path.step.build_step_path(self.directory, ocp.path.step.standard_name_format(), step)
    return (path / COMMIT_FILE).exists()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (an async save in flight counts once `save` has returned); an uncommitted step
    directory is skipped with a warning."""
    in_flight = self.manager.is_saving_in_progress()
    steps = []
    for step in self.manager.all_steps():
      if self.is_committed(step) or (in_flight and step == self.manager.latest_step()):
        steps.append(step)
      else:
        log.warning("checkpoint step %d in %s has no %s (an incomplete write); skipping it", step, self.directory,
                    COMMIT_FILE)
    return steps

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

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
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_meta(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any] | None:
  """The `meta` of a workdir's checkpoint `step` (default: the latest); None without checkpoints or workdir."""
  if not is_workdir(workdir):
    return None
  with CheckpointReader(workdir) as reader:
    return reader.restore_meta(step)


def _subtree(tree: Any, path: Sequence[str]) -> Any | None:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def load_model_from_workdir(workdir: str | os.PathLike, *, ema: bool | None = None, step: int | None = None,
                            params_path: Sequence[str] = PARAMS_PATH, ema_path: Sequence[str] = EMA_PATH,
                            **overrides):
  """`(model, params)` of a training workdir's checkpoint (default: the latest), without the optimizer.

  The model comes from the checkpoint's `meta["model"]` spec (`registry.model_from_spec(spec, **overrides)`); only
  the params subtree at `params_path` in the saved state is read (Orbax partial restore), or its EMA copy at
  `ema_path`: `ema=None` takes the EMA copy when the checkpoint has one, `ema=True` requires it, `ema=False` takes
  the raw params. Strict: every parameter of the model must be in the checkpoint with its shape and nothing else may
  be there (`ConversionError` lists all). Params are placed on this process's first device, with the model's
  `param_dtype`.
  """
  if not is_workdir(workdir):
    raise FileNotFoundError(f"expected a training workdir with {CHECKPOINTS_DIR}/, got {os.fspath(workdir)}")
  with CheckpointReader(workdir) as reader:
    where = reader.directory
    steps = reader.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {where}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"expected step to be one of the committed steps {steps}, got {step}")
    meta = reader.restore_meta(step)
    if "model" not in meta:
      raise ValueError(f"checkpoint {where}/{step}: expected meta['model'] (the model spec, see "
                       f"checkpoint.make_meta(model=...)), got meta keys {sorted(meta)}")
    model = registry.model_from_spec(meta["model"], **overrides)

    saved_tree = reader.state_metadata(step)
    has_ema = _subtree(saved_tree, ema_path) is not None
    if ema is None:
      ema = has_ema
    if ema and not has_ema:
      raise ValueError(f"checkpoint {where}/{step} has no EMA params at {'/'.join(ema_path)} (ema=True); "
                       f"top-level state keys: {sorted(saved_tree)}")
    path = tuple(ema_path if ema else params_path)
    saved = _subtree(saved_tree, path)
    if saved is None:
      raise ValueError(f"checkpoint {where}/{step} has no params at {'/'.join(path)}; top-level state keys: "
                       f"{sorted(saved_tree) if isinstance(saved_tree, Mapping) else saved_tree}")

    expected = registry.param_shapes(model)
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
      raise ConversionError(f"params at {'/'.join(path)} of {where}/{step} do not fit "
                            f"{meta['model'].get('class')}:\n" + "\n".join(lines))

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in expected.items()}, sep="/")
    for key in reversed(path):
      target = {key: target}
    restored = reader.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)}))
  return model, _subtree(restored[STATE], path)
