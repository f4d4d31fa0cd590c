"""Rematerialization (`jax.checkpoint`) policies: which parts of a training step recompute their activations in the
backward pass instead of keeping them.

A policy is a name, set in the config (`config.train.remat`) and handed to the models as a static field:

  none             keep every activation (fastest, most memory);
  blocks           recompute inside each res block (the res blocks' inputs are kept);
  full             recompute inside every unit with large activations: res blocks, down/upsamplers, the mid-block
                   attention, the output norm of the encoder and decoder; the trainer adds the frozen networks of the
                   loss (LPIPS, the regularizer's image decoder: one frame at a time, see `checkpointed_map`) and the
                   discriminator's res blocks;
  full_save_convs  as `full`, but each unit keeps its convolution outputs (`jax.checkpoint_policies.dots_saveable`)
                   and recomputes only norms and activations: less recompute, more memory.
  full_halves      as `full`, but each res block is recomputed as two units (norm1-SiLU-conv1, then norm2-SiLU-conv2
                   with the shortcut): the block's output of conv1 is kept as well, and only half a block's
                   backward is live at once (the same FLOPs as `full`).

Units keep their parameter names: the remat wrappers are Flax lifted transforms (`nn.remat`), which add no scope.
`True` / `False` (the older boolean field) mean `blocks` / `none`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

POLICIES = ("none", "blocks", "full", "full_save_convs", "full_halves")
# The model units each policy recomputes (the trainer's own parts are "loss" and "discriminator").
_FULL = frozenset({"res", "resample", "attention", "norm_out", "loss", "discriminator"})
_PARTS = {"none": frozenset(), "blocks": frozenset({"res"}), "full": _FULL, "full_save_convs": _FULL,
          "full_halves": (_FULL - {"res"}) | {"res_halves"}}


def policy_name(remat: Any) -> str:
  """The policy a `remat` field or config value names; raises a clear error for anything else."""
  if isinstance(remat, bool):
    return "blocks" if remat else "none"
  if remat is None:
    return "none"
  if remat not in POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; expected one of {POLICIES} (or True / False)")
  return remat


def covers(remat: Any, part: str) -> bool:
  """Whether policy `remat` recomputes `part` ("res", "res_halves", "resample", "attention", "norm_out", "loss",
  ...)."""
  return part in _PARTS[policy_name(remat)]


def _jax_policy(remat: Any) -> Callable | None:
  """What a recomputed unit keeps: nothing but its inputs (None), or its convolution outputs."""
  return jax.checkpoint_policies.dots_saveable if policy_name(remat) == "full_save_convs" else None


def module(cls: type[nn.Module], remat: Any, part: str) -> type[nn.Module]:
  """`cls`, recomputed in the backward pass when the policy covers `part` (same fields, same parameter names)."""
  if not covers(remat, part):
    return cls
  return nn.remat(cls, policy=_jax_policy(remat))


def function(fn: Callable, remat: Any, part: str) -> Callable:
  """`fn(module, *args)` (a Flax function of a bound module), recomputed when the policy covers `part`. Submodules
  it creates keep the names they would have without it."""
  if not covers(remat, part):
    return fn
  return nn.remat(fn, policy=_jax_policy(remat))


def checkpointed_map(fn: Callable[..., jax.Array], remat: Any, *xs: jax.Array, chunk: int = 1) -> jax.Array:
  """`fn(*xs)` for a function that acts on each row of its inputs' leading axis independently (frames of a loss,
  images through a frozen decoder).

  When the policy covers "loss", runs `fn` on `chunk` rows at a time (`lax.map`) with each call recomputed in the
  backward pass: only one chunk's activations are ever live, at the cost of one more forward of `fn`. `chunk` 0 (or
  the whole axis) recomputes one call on everything: the same FLOPs, all rows' activations live at once in the
  backward pass (XLA's cost analysis counts a loop body once, so this is also how to count the loop's FLOPs).
  Without "loss", one plain call. The leading axis must be divisible by `chunk`; the result is `[N, ...]`.
  """
  if not covers(remat, "loss"):
    return fn(*xs)
  n = xs[0].shape[0]
  if chunk == 0 or chunk == n:
    return jax.checkpoint(fn, policy=_jax_policy(remat))(*xs)
  if chunk < 0 or n % chunk:
    raise ValueError(f"checkpointed_map: expected a chunk dividing the leading axis {n} (or 0), got {chunk}")
  grouped = [x.reshape((n // chunk, chunk) + x.shape[1:]) for x in xs]
  out = jax.lax.map(jax.checkpoint(lambda args: fn(*args), policy=_jax_policy(remat)), grouped)
  return out.reshape((n,) + out.shape[2:])
