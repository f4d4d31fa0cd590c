"""Multi-process start-up of the commands: `jax.distributed.initialize` from the environment, when it has one."""
from __future__ import annotations

import importlib.util
import os

import jax
from absl import logging

# Environment that says this is one process of several (set by the launcher, SLURM, or a TPU pod runtime).
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_AUTO_ENVS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize() -> None:
  """Calls `jax.distributed.initialize` when the environment describes several processes.

  Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (and optionally
  JAX_LOCAL_DEVICE_IDS). Automatic: SLURM and TPU VMs, single hosts and pods (jax detects them). Otherwise a
  single process.
  """
  if os.environ.get(_COORDINATOR_ENV):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"{_COORDINATOR_ENV} is set, so {missing} must be set too")
    jax.distributed.initialize(coordinator_address=os.environ[_COORDINATOR_ENV],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif any(os.environ.get(k) for k in _AUTO_ENVS) or importlib.util.find_spec("libtpu") is not None:
    # TPU VMs (libtpu installed; pods started with `gcloud ... ssh --worker=all`) set no environment: jax finds the
    # workers from the TPU metadata server. Without this, TPU pods would run without the coordination service
    # (no preemption sync point, so SIGTERM would not save a checkpoint).
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
