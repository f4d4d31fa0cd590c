"""Importing the original CV-VAE PyTorch classes from a user-given checkout, for benchmarks and parity checks only.

The original attention calls `xformers.ops.memory_efficient_attention`, which has no CPU kernel; `load_original_class`
installs a stand-in module computing the same single-head attention with torch's `scaled_dot_product_attention`
(softmax(q k^T / sqrt(C)) v). Nothing of the original is copied here.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import types


def install_xformers_shim() -> None:
  if "xformers" in sys.modules:
    return
  import torch.nn.functional as F

  def memory_efficient_attention(q, k, v, attn_bias=None, op=None, **unused):
    if attn_bias is not None:
      raise NotImplementedError("the shim supports attn_bias=None only")
    return F.scaled_dot_product_attention(q, k, v)

  xformers = types.ModuleType("xformers")
  ops = types.ModuleType("xformers.ops")
  ops.memory_efficient_attention = memory_efficient_attention
  xformers.ops, xformers.__version__ = ops, "0.0.28"
  xformers.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
  ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
  sys.modules["xformers"], sys.modules["xformers.ops"] = xformers, ops


def load_original_class(repo: str, name: str = "CVVAEModel"):
  """`models.modeling_vae.<name>` from a CV-VAE checkout at `repo`, or None if there is none."""
  if not repo or not os.path.isfile(os.path.join(repo, "models", "modeling_vae.py")):
    return None
  install_xformers_shim()
  if repo not in sys.path:
    sys.path.insert(0, repo)
  from models import modeling_vae  # noqa: the original repository's package

  return getattr(modeling_vae, name)
