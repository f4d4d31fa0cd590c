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

Units keep their parameter names: the remat wrappers are Flax lifted transforms (`nn.remat`, `nn.custom_vjp`), which
add no scope. `True` / `False` (the older boolean field) mean `blocks` / `none`. `frozen(policy)` is the same policy
for a network whose parameters get no gradient in the program (the frozen image VAE, the discriminator in the
generator's step).

Each recomputed unit's backward runs in order, as data dependencies (`_after`), not only as `jax.checkpoint`'s
optimization barriers, which XLA:CPU removes before it schedules (`OptimizationBarrierExpander`): the recomputation
waits for the unit's output cotangent, and the cotangent it passes on waits for its parameters' gradients. Without
them XLA:CPU's memory scheduler recomputed the decoder's last level long before its backward ran and left its kernel
gradients (and the activations they read) to the end of the step: the full step at one clip per device held 17.7
GiB, 11.5 GiB with the order kept (bench/README_train.md). The dependencies add `0 x` one element of a cotangent to
each residual and input cotangent: no FLOPs to speak of, and the values do not change.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

POLICIES = ("none", "blocks", "full", "full_save_convs", "full_halves")
# The model units each policy recomputes (the trainer's own parts are "loss" and "discriminator").
_FULL = frozenset({"res", "resample", "attention", "norm_out", "loss", "discriminator"})
_PARTS = {"none": frozenset(), "blocks": frozenset({"res"}), "full": _FULL, "full_save_convs": _FULL,
          "full_halves": (_FULL - {"res"}) | {"res_halves"}}


@dataclasses.dataclass(frozen=True)
class Frozen:
  """A policy for a network whose parameters are constants of the program (see `frozen`)."""
  policy: str


def frozen(remat: Any) -> Frozen:
  """`remat`'s policy for a network whose parameters get no gradient here: the same units are recomputed, and their
  backward does not compute (or wait for) parameter gradients that nothing uses."""
  return Frozen(policy_name(remat))


def policy_name(remat: Any) -> str:
  """The policy a `remat` field or config value names; raises a clear error for anything else."""
  if isinstance(remat, Frozen):
    return remat.policy
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


def _after(tree: Any, anchor: Any) -> Any:
  """`tree`, its float leaves made to depend on `anchor`'s (each plus 0 x the sum of one element of every float leaf
  of `anchor`); the same values. No float leaf in `anchor`: `tree` itself."""
  is_float = lambda a: jnp.issubdtype(a.dtype, jnp.floating)
  firsts = [a[(0,) * a.ndim].astype(jnp.float32) for a in jax.tree.leaves(anchor) if is_float(a)]
  if not firsts:
    return tree
  zero = sum(firsts) * 0.0
  return jax.tree.map(lambda a: a + zero.astype(a.dtype) if is_float(a) else a, tree)


def _recomputed(fn: Callable, remat: Any) -> Callable:
  """`fn(module, *args)` under `nn.remat`, its backward in order: the recomputation after the output cotangent
  arrives and, unless the policy is `frozen`, the input cotangents after the parameter gradients."""
  checkpointed = nn.remat(fn, policy=_jax_policy(remat))
  param_grads = not isinstance(remat, Frozen)

  def forward(mdl, *args):
    return nn.vjp(checkpointed, mdl, *args)  # the residuals: the unit's inputs and parameters (and what it saves)

  def backward(vjp_fn, out_t):
    params_t, *inputs_t = _after(vjp_fn, out_t)(out_t)
    return (params_t, *(_after(inputs_t, params_t) if param_grads else inputs_t))

  return nn.custom_vjp(checkpointed, forward_fn=forward, backward_fn=backward)


def module(cls: type[nn.Module], remat: Any, part: str) -> type[nn.Module]:
  """`cls`, recomputed in the backward pass when the policy covers `part` (same fields, same parameter names)."""
  if not covers(remat, part):
    return cls
  unit = _recomputed(cls.__call__, remat)

  class Recomputed(cls):
    def __call__(self, *args):
      return unit(self, *args)

  Recomputed.__name__, Recomputed.__qualname__ = cls.__name__, cls.__qualname__
  return Recomputed


def function(fn: Callable, remat: Any, part: str) -> Callable:
  """`fn(module, *args)` (a Flax function of a bound module), recomputed when the policy covers `part`. Submodules
  it creates keep the names they would have without it."""
  if not covers(remat, part):
    return fn
  return _recomputed(fn, remat)


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
