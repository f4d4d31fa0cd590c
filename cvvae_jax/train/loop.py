"""The training loop, `train_and_evaluate(config, workdir)`: CV-VAE (`config.model.kind = "cvvae"`) or the SD
image VAE itself (`"image_vae"`, on 1-frame batches, without the regularizer).

Data flows one way: config -> data -> model -> loss -> optimizer -> step -> checkpoint/metrics. Start-up, as in
big_vision: shapes first (`jax.eval_shape`), then shardings, then the workdir's latest checkpoint (resume), else
`config.init_from` (inflated or pretrained params), else a random init. The generator and the discriminator are
updated on alternate steps (as the original) or both every step (`train.alternate_updates=False`); the frozen
networks (the SD image VAE of the latent regularizer, LPIPS) are inputs of the step, never trained and never
checkpointed.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import traverse_util

from cvvae_jax import data as data_lib
from cvvae_jax import paths
from cvvae_jax.models import registry
from cvvae_jax.train import build, checkpoint, probe as probe_lib, records, sharding
from cvvae_jax.train.state import TrainState, init_state
from cvvae_jax.train.step import MetricWindow, TrainStep, micro_batches


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config` in `workdir` (a local folder or `gs://...`; resuming its latest checkpoint); returns the
  final state. Process 0 also writes `config.json`, `history.json` (as it goes), `loss_curves.png` (at each
  checkpoint and at the end), TensorBoard events and `images/` there."""
  workdir = paths.path(workdir)
  build.validate_config(config)
  if config.optim.generator.total_steps != config.train.num_steps:
    logging.warning("config.optim.generator.total_steps=%d differs from config.train.num_steps=%d: the generator's "
                    "cosine schedule does not end at the last step (override both together)",
                    config.optim.generator.total_steps, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  for name, stream in config.data.streams.items():
    sharding.check_batch_divisible(stream.batch_size, mesh, f"config.data.streams.{name}.batch_size")
    sharding.check_spatial_size(stream.size, mesh, len(config.model.block_out_channels),
                                f"config.data.streams.{name}.size")
  data_group, data_groups = sharding.data_groups(mesh)  # processes of one spatial group load the same clips
  is_lead = jax.process_index() == 0

  # Models and frozen networks.
  image_vae, frozen_host = build.load_frozen(config, config.model.kind)
  models = build.build_models(config, image_vae, sharding.activation_sharding(mesh))
  for stream in config.data.streams.values():  # image micro-batches must divide each device's images: fail now
    micro_batches(models, (stream.batch_size, stream.frames), mesh)
  frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen_host), mesh)
  frozen = jax.device_put(frozen_host, frozen_sh)

  # State: shapes first, then shardings, then restore or initialise.
  root = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(functools.partial(init_state, models), root)
  state_sh = sharding.state_shardings(abstract, mesh)
  manager = checkpoint.CheckpointManager.from_config(workdir, config.train)
  try:
    state = _restore_or_init(config, models, mesh, manager, root, abstract, state_sh, frozen_host)
    start_step = int(state.step)

    step_fn = TrainStep(models, mesh, state_sh, frozen_sh)
    reconstructor = probe_lib.Reconstructor(models, mesh, frozen)
    extra = ({"image_vae": {"path": config.image_vae.path, "model": registry.model_spec(image_vae)}}
             if image_vae is not None else {})
    meta = checkpoint.make_meta(model=models.vae, config=config, **extra)

    if is_lead:
      workdir.mkdir(parents=True, exist_ok=True)
      paths.write_atomic(workdir / "config.json", json.dumps(meta["config"], indent=2))
    writer = records.create_writer(workdir, just_logging=not is_lead)
    if start_step == 0 and is_lead:
      writer.write_hparams(_flat_config(config))
    num_steps = int(config.train.num_steps)
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.train.log_every_steps)
    reached_preemption = checkpoint.install_preemption_handler()
    history = records.History(writer)
    if is_lead and start_step > 0:
      history.resume(workdir, start_step)
    if is_lead and manager.skipped:
      history.note(start_step, records.CHECKPOINT_FALLBACK, manager.skipped)
    batches = data_lib.create_train_iterator(config.data, seed=config.data.seed, start_step=start_step,
                                             process_index=data_group, process_count=data_groups)
    probe = probe_lib.load_probe(config, models) if config.train.eval_every_steps > 0 else None
    probe_every = config.train.eval_every_steps
    t0, examples, picture_batch, window = time.time(), 0, None, MetricWindow()

    if probe is not None and start_step == 0:
      _probe(reconstructor, state, probe, config, models, history, 0)
    logging.info("training %s for %d steps on mesh %s from step %d", type(models.vae).__name__, num_steps,
                 dict(mesh.shape), start_step)
    step = start_step
    try:
      while step < num_steps:
        batch = next(batches)
        video = sharding.shard_host_batch({"video": batch["video"]}, mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics, update = step_fn(state, video, root, frozen, step)
        window.add(update, metrics)
        step += 1
        manager.check()  # an async save that failed stops the run here, at the next step
        examples += batch["video"].shape[0] * data_groups
        report(step)
        if step % config.train.log_every_steps == 0 or step == num_steps:
          _check_nan_streak(state, step, config, manager)
          elapsed = time.time() - t0
          scalars = window.result()
          scalars.update({"perf/examples_per_s": examples / elapsed, "perf/steps_per_s": (step - start_step) / elapsed})
          history.record(step, scalars)
          _log_step(step, num_steps, scalars)
        if batch["video"].shape[1] > 1 or not models.is_video:
          picture_batch = batch["video"][:2]  # the latest clip batch (CV-VAE) or image batch, for pictures
        if step % config.train.image_every_steps == 0 and picture_batch is not None:
          pictures, x_hat, decoded = reconstructor(state.params, picture_batch)  # every process; process 0 writes
          if is_lead:
            grid = records.reconstruction_grid(pictures, x_hat, decoded)
            records.save_png(workdir / "images" / f"reconstruction_{step:07d}.png", grid)
            writer.write_images(step, {"reconstruction": grid[None]})
        if probe is not None and (step % probe_every == 0 or step == num_steps):
          _probe(reconstructor, state, probe, config, models, history, step)
        preempted = reached_preemption(step)
        saving = manager.should_save(step) or step == num_steps or preempted
        if is_lead and (history.changed or saving):  # before the checkpoint: a resume finds every step up to it
          history.save(workdir, curves=records.CURVES if saving else None)
          writer.flush()
        if saving:
          manager.save(step, state, {**meta, "data": batches.state()}, force=True)
        if preempted:
          logging.warning("preemption signal: saved step %d, exiting", step)
          break
    finally:
      batches.close()
      writer.close()
    manager.close()  # waits for the last save; raises its failure
  except BaseException:
    _close_after_error(manager)
    raise
  if is_lead:
    history.save(workdir)
  return state


def _close_after_error(manager: checkpoint.CheckpointManager) -> None:
  """Closes the manager while an error propagates (Orbax's threads and event loops end before the interpreter's;
  left open, they fail at exit with pages of `RuntimeError: Event loop is closed`); its own failure is logged, the
  first error is the one reported."""
  try:
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("while stopping after an error: %s", e)


def _restore_or_init(config, models: build.Models, mesh, manager: checkpoint.CheckpointManager, root: jax.Array,
                     abstract: TrainState, state_sh: Any, frozen_host: dict) -> TrainState:
  """The workdir's latest checkpoint, else a fresh state from `config.init_from`, placed on `state_sh`."""
  restored = manager.restore_latest(sharding.with_shardings(abstract, state_sh))
  if restored is not None:
    state, _ = restored
    logging.info("resumed from %s at step %d", manager.directory, int(state.step))
    return state
  vae_params = build.initial_vae_params(config, models, frozen_host)
  if vae_params is not None:
    vae_params = jax.device_put(vae_params, sharding.param_shardings(jax.eval_shape(lambda: vae_params), mesh))
  return jax.jit(functools.partial(init_state, models), out_shardings=state_sh)(root, vae_params)


def _probe(reconstructor: probe_lib.Reconstructor, state: TrainState, probe: np.ndarray, config,
           models: build.Models, history: records.History, step: int) -> None:
  """Probe metrics of the current params, recorded and logged (all processes make the same calls)."""
  scalars = probe_lib.run_probe(reconstructor, state.params, probe, int(config.data.eval.batch_size),
                                getattr(models.vae, "temporal_compression", 1))
  history.record(step, scalars)
  logging.info("step %d probe (%d fixed clips): %s", step, len(probe),
               ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))


def _check_nan_streak(state: TrainState, step: int, config, manager: checkpoint.CheckpointManager) -> None:
  """Stops the run when `train.max_nan_steps` steps in a row were skipped as non-finite."""
  if int(state.nan_streak) >= config.train.max_nan_steps:
    manager.wait_until_finished()
    raise FloatingPointError(
        f"{int(state.nan_streak)} consecutive steps (up to {step}) had non-finite loss or gradients and "
        f"were skipped (config.train.max_nan_steps={config.train.max_nan_steps}); the last good "
        f"checkpoint is step {manager.latest_step()} in {manager.directory}")


def _log_step(step: int, num_steps: int, scalars: dict[str, float]) -> None:
  eta = (num_steps - step) / max(scalars["perf/steps_per_s"], 1e-9)
  logging.info("step %d/%d (%.0f%%) loss %.4g nll %.4g reg %.4g | %.2f steps/s, ETA %.0fs", step, num_steps,
               100 * step / num_steps, scalars.get("loss/total", np.nan), scalars.get("loss/nll", np.nan),
               scalars.get("loss/reg_decoder", np.nan), scalars["perf/steps_per_s"], eta)


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
