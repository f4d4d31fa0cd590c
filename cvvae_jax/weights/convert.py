"""PyTorch <-> Flax conversion of CV-VAE (both variants) and the SD image VAE params, strict in both directions.

With `torch_format.py`, the only place that knows PyTorch names and layouts. Conversion is one declarative table of
rules per naming family (ldm-style `CVVAEModel`, diffusers-style `CVVAESD3Model` and `AutoencoderKL`); each rule pairs
a torch key template with a Flax path template and a layout, and is applied in either direction:

    Rule("encoder.down.{i}.block.{j}.conv1.weight", "encoder/down_{i}/res_{j}/conv1/kernel", Layout.CONV)

Loading checks that every source tensor is used exactly once, every Flax parameter is filled and every shape
matches, and raises one `ConversionError` listing everything missing, unexpected or mis-shaped.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import re
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from cvvae_jax.models.registry import param_shapes
from cvvae_jax.models.vae3d import CVVAE

__all__ = ["Layout", "torch_to_flax_array", "flax_to_torch_array", "flax_to_torch_shape", "torch_layout", "Rule",
           "ldm_rules", "diffusers_rules", "rules_for", "ConversionError", "torch_to_flax", "flax_to_torch"]


class Layout(enum.Enum):
  VECTOR = "vector"            # 1-D: identical
  CONV = "conv"                # torch [O, I, *k] <-> flax [*k, I, O]
  LINEAR = "linear"            # torch [O, I] <-> flax Dense [I, O]
  CONV1X1_DENSE = "conv1x1"    # torch 1x1 conv [O, I, 1, 1] <-> flax Dense [I, O]


def torch_to_flax_array(a: np.ndarray, layout: Layout) -> np.ndarray:
  if layout is Layout.VECTOR:
    return a
  if layout is Layout.CONV:
    return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))
  if layout is Layout.LINEAR:
    return a.T
  if a.ndim != 4 or a.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 convolution weight [O, I, 1, 1], got shape {a.shape}")
  return a[:, :, 0, 0].T


def flax_to_torch_array(a: np.ndarray, layout: Layout) -> np.ndarray:
  if layout is Layout.VECTOR:
    return a
  if layout is Layout.CONV:
    n = a.ndim
    return np.transpose(a, (n - 1, n - 2) + tuple(range(n - 2)))
  if layout is Layout.LINEAR:
    return a.T
  return a.T[:, :, None, None]


def flax_to_torch_shape(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
  """The torch shape of a Flax parameter of `shape` (without touching data)."""
  shape = tuple(shape)
  if layout is Layout.VECTOR:
    return shape
  if layout is Layout.CONV:
    return (shape[-1], shape[-2]) + shape[:-2]
  if layout is Layout.LINEAR:
    return shape[::-1]
  return shape[::-1] + (1, 1)


def torch_layout(model) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{torch key: (flax path, torch shape)} of everything `save_pretrained` writes for `model` (no allocation)."""
  rules = [r for r in rules_for(model) if not r.legacy]
  out = {}
  for path, spec in param_shapes(model).items():
    for rule in rules:
      if (fields := rule.match(path, "flax")) is not None:
        out[rule.render(fields, "torch")] = (path, flax_to_torch_shape(spec.shape, rule.layout))
        break
    else:
      raise ConversionError(f"no torch name for flax parameter {path}")
  return out


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: torch key template <-> Flax path template ('/'-separated), with integer fields like {i}.

  `index_maps` maps a field name to an involution applied when crossing sides (the ldm decoder numbers its
  levels in reverse). `legacy` rules are accepted on load only (old diffusers attention names).
  """

  torch: str
  flax: str
  layout: Layout
  index_maps: tuple[tuple[str, Callable[[int], int]], ...] = ()
  legacy: bool = False

  @functools.cached_property
  def _patterns(self) -> dict[str, re.Pattern]:
    def compile_template(template):
      parts = re.split(r"(\{\w+\})", template)
      return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts))
    return {"torch": compile_template(self.torch), "flax": compile_template(self.flax)}

  def match(self, key: str, side: str) -> dict[str, int] | None:
    m = self._patterns[side].fullmatch(key)
    return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

  def render(self, fields: dict[str, int], side: str) -> str:
    maps = dict(self.index_maps)
    fields = {k: maps[k](v) if k in maps else v for k, v in fields.items()}
    return (self.flax if side == "flax" else self.torch).format(**fields)


def _module(torch: str, flax: str, kind: str, **kw) -> list[Rule]:
  """Rules for one torch module (weight + bias) <-> one Flax module (kernel/scale + bias)."""
  if kind == "norm":
    return [Rule(f"{torch}.weight", f"{flax}/scale", Layout.VECTOR, **kw),
            Rule(f"{torch}.bias", f"{flax}/bias", Layout.VECTOR, **kw)]
  layout = {"conv": Layout.CONV, "linear": Layout.LINEAR, "conv1x1": Layout.CONV1X1_DENSE}[kind]
  return [Rule(f"{torch}.weight", f"{flax}/kernel", layout, **kw),
          Rule(f"{torch}.bias", f"{flax}/bias", Layout.VECTOR, **kw)]


def _res_block(torch: str, flax: str, shortcut: str, **kw) -> list[Rule]:
  rules = []
  for name in ("norm1", "norm2"):
    rules += _module(f"{torch}.{name}", f"{flax}/{name}", "norm", **kw)
  for name in ("conv1", "conv2"):
    rules += _module(f"{torch}.{name}", f"{flax}/{name}", "conv", **kw)
  return rules + _module(f"{torch}.{shortcut}", f"{flax}/shortcut", "conv", **kw)


def ldm_rules(num_levels: int) -> list[Rule]:
  """`CVVAEModel` (the SD2.1-compatible CV-VAE): ldm names, 1x1-conv attention, reversed decoder levels."""
  rev = (("i", lambda v: num_levels - 1 - v),)
  rules = []
  for side in ("encoder", "decoder"):
    rules += _module(f"{side}.conv_in", f"{side}/conv_in", "conv")
    rules += _module(f"{side}.conv_out", f"{side}/conv_out", "conv")
    rules += _module(f"{side}.norm_out", f"{side}/norm_out", "norm")
    for t, f in (("block_1", "res_0"), ("block_2", "res_1")):
      rules += _res_block(f"{side}.mid.{t}", f"{side}/mid/{f}", "nin_shortcut")
    rules += _module(f"{side}.mid.attn_1.norm", f"{side}/mid/attn/spatial/norm", "norm")
    for t, f in (("q", "q"), ("k", "k"), ("v", "v"), ("proj_out", "proj_out")):
      rules += _module(f"{side}.mid.attn_1.{t}", f"{side}/mid/attn/spatial/{f}", "conv1x1")
  rules += _res_block("encoder.down.{i}.block.{j}", "encoder/down_{i}/res_{j}", "nin_shortcut")
  rules += _module("encoder.down.{i}.downsample.conv", "encoder/down_{i}/downsample/conv", "conv")
  rules += _res_block("decoder.up.{i}.block.{j}", "decoder/up_{i}/res_{j}", "nin_shortcut", index_maps=rev)
  rules += _module("decoder.up.{i}.upsample.conv", "decoder/up_{i}/upsample/conv", "conv", index_maps=rev)
  rules += _module("decoder.mid.attn_1.norm_t", "decoder/mid/attn/temporal/norm", "norm")
  for t, f in (("q_t", "q"), ("k_t", "k"), ("v_t", "v"), ("proj_out_t", "proj_out")):
    rules += _module(f"decoder.mid.attn_1.{t}", f"decoder/mid/attn/temporal/{f}", "linear")
  return rules


def diffusers_rules() -> list[Rule]:
  """`AutoencoderKL` and `CVVAESD3Model`: diffusers names (decoder levels in execution order)."""
  rules = []
  for side in ("encoder", "decoder"):
    rules += _module(f"{side}.conv_in", f"{side}/conv_in", "conv")
    rules += _module(f"{side}.conv_out", f"{side}/conv_out", "conv")
    rules += _module(f"{side}.conv_norm_out", f"{side}/norm_out", "norm")
    rules += _res_block(f"{side}.mid_block.resnets.{{j}}", f"{side}/mid/res_{{j}}", "conv_shortcut")
    attn_t, attn_f = f"{side}.mid_block.attentions.0", f"{side}/mid/attn/spatial"
    rules += _module(f"{attn_t}.group_norm", f"{attn_f}/norm", "norm")
    for new, old, f in (("to_q", "query", "q"), ("to_k", "key", "k"), ("to_v", "value", "v"),
                        ("to_out.0", "proj_attn", "proj_out")):
      rules += _module(f"{attn_t}.{new}", f"{attn_f}/{f}", "linear")
      rules += _module(f"{attn_t}.{old}", f"{attn_f}/{f}", "linear", legacy=True)
  rules += _res_block("encoder.down_blocks.{i}.resnets.{j}", "encoder/down_{i}/res_{j}", "conv_shortcut")
  rules += _module("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder/down_{i}/downsample/conv", "conv")
  rules += _res_block("decoder.up_blocks.{i}.resnets.{j}", "decoder/up_{i}/res_{j}", "conv_shortcut")
  rules += _module("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder/up_{i}/upsample/conv", "conv")
  rules += _module("quant_conv", "quant_conv", "conv")
  rules += _module("post_quant_conv", "post_quant_conv", "conv")
  return rules


def rules_for(model) -> list[Rule]:
  if isinstance(model, CVVAE) and model.variant == "sd21":
    return ldm_rules(len(model.block_out_channels))
  return diffusers_rules()



class ConversionError(ValueError):
  """A state dict or params tree that does not fit the model; the message lists every problem."""


def _raise_if(problems: dict[str, list[str]], what: str) -> None:
  lines = []
  for title, items in problems.items():
    if items:
      lines.append(f"{title} ({len(items)}):")
      lines += [f"  {item}" for item in sorted(items)]
  if lines:
    raise ConversionError(f"{what}:\n" + "\n".join(lines))


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model, source: str = "state dict") -> dict:
  """Torch state dict (numpy arrays, torch names and layouts) -> Flax `params` tree for `model`. Strict."""
  rules = rules_for(model)
  expected = param_shapes(model)
  flat, origin, seen = {}, {}, set()
  problems = {"unexpected keys (no rule or no such parameter in this model)": [],
              "keys mapped twice": [], "shape mismatches": [], "missing keys": []}
  for key, value in state_dict.items():
    matches = [(r, f) for r in rules if (f := r.match(key, "torch")) is not None]
    if not matches:
      problems["unexpected keys (no rule or no such parameter in this model)"].append(key)
      continue
    rule, fields = matches[0]
    path = rule.render(fields, "flax")
    if path not in expected:
      problems["unexpected keys (no rule or no such parameter in this model)"].append(f"{key} (-> {path})")
      continue
    if path in seen:
      problems["keys mapped twice"].append(f"{key} and {origin[path]} both give {path}")
      continue
    seen.add(path)
    origin[path] = key
    value = np.asarray(value)
    try:
      arr = torch_to_flax_array(value, rule.layout)
    except ValueError as e:
      problems["shape mismatches"].append(f"{key}: {e}")
      continue
    if arr.shape != tuple(expected[path].shape):
      want = flax_to_torch_shape(expected[path].shape, rule.layout)
      problems["shape mismatches"].append(f"{key}: got {tuple(value.shape)}, expected {tuple(want)} (flax {path})")
      continue
    flat[path] = arr.astype(expected[path].dtype)
  for path in expected:
    if path not in seen:
      problems["missing keys"].append(_torch_name(rules, path) + f" (flax {path})")
  _raise_if(problems, f"cannot load {source} into {type(model).__name__}")
  return traverse_util.unflatten_dict(flat, sep="/")


def _torch_name(rules: list[Rule], path: str) -> str:
  for rule in rules:
    if not rule.legacy and (fields := rule.match(path, "flax")) is not None:
      return rule.render(fields, "torch")
  return "<no torch name>"


def flax_to_torch(params: Mapping, model) -> dict[str, np.ndarray]:
  """Flax `params` tree -> torch state dict (numpy float32, torch names and layouts). Strict."""
  rules = [r for r in rules_for(model) if not r.legacy]
  expected = param_shapes(model)
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  out = {}
  problems = {"parameters this model does not have": [], "parameters with no torch name": [],
              "shape mismatches": [], "missing parameters": sorted(set(expected) - set(flat))}
  for path, value in flat.items():
    if path not in expected:
      problems["parameters this model does not have"].append(path)
      continue
    value = np.asarray(jax.device_get(value))
    if value.shape != tuple(expected[path].shape):
      problems["shape mismatches"].append(f"{path}: got {value.shape}, expected {tuple(expected[path].shape)}")
      continue
    matches = [(r, f) for r in rules if (f := r.match(path, "flax")) is not None]
    if not matches:
      problems["parameters with no torch name"].append(path)
      continue
    rule, fields = matches[0]
    out[rule.render(fields, "torch")] = np.ascontiguousarray(flax_to_torch_array(value, rule.layout),
                                                             dtype=np.float32)
  _raise_if(problems, f"cannot export params of {type(model).__name__}")
  return out
