"""PyTorch <-> Flax conversion of CV-VAE (both variants) and the SD image VAE, strict in both directions.

This is the only module that knows PyTorch names and layouts. Conversion is one declarative table of rules per
naming family (ldm-style `CVVAEModel`, diffusers-style `CVVAESD3Model` and `AutoencoderKL`); each rule pairs a
torch key template with a Flax path template and a layout, and is applied in either direction:

    Rule("encoder.down.{i}.block.{j}.conv1.weight", "encoder/down_{i}/res_{j}/conv1/kernel", Layout.CONV)

Loading checks that every source tensor is used exactly once, every Flax parameter is filled and every shape
matches, and raises one error listing everything missing, unexpected or mis-shaped. Files are read and written
with `safetensors.numpy`: no torch needed.

Command line:  python -m cvvae_jax.convert SRC DST --to {torch,flax}
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import functools
import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvvae_jax.sd_vae import ImageVAE
from cvvae_jax.vae3d import CVVAE

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


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
  for path, spec in init_shapes(model).items():
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


# ----------------------------------------------------------------------------------------------------------------
# Model <-> config.json


_CVVAE_SD21_CONFIG = {
    "_class_name": "CVVAEModel", "_diffusers_version": "0.32.2", "attn_resolutions": [], "causal_decoder": False,
    "causal_encoder": True, "ch": 128, "ch_mult": [1, 2, 4, 4], "decoder_attn_type": "spatial-temporal-xformer",
    "double_z": True, "dropout": 0.0, "en_de_n_frames_a_time": 16, "encoder_attn_type": "vanilla-xformers",
    "force_upcast": True, "half_3d": True, "in_channels": 3, "num_res_blocks": 2, "num_video_frames": None,
    "out_ch": 3, "reshape_x_dim_to_4": False, "reshape_z_dim_to_4": False, "scaling_factor": 0.18215,
    "spatial_n_compress": 8, "tile_overlap_ratio": 0.2222, "tile_spatial_size": 576, "time_n_compress": 4,
    "use_3d_conv": True, "z_channels": 4}
_CVVAE_SD3_CONFIG = {
    "_class_name": "CVVAESD3Model", "_diffusers_version": "0.32.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "causal_decoder": False, "causal_encoder": True, "double_z": True,
    "down_block_types": ["DownEncoderBlock3D"] * 4, "en_de_n_frames_a_time": 16, "half_3d": True,
    "in_channels": 3, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
    "num_video_frames": None, "out_channels": 16, "reshape_x_dim_to_4": False, "reshape_z_dim_to_4": False,
    "spatial_n_compress": 8, "tile_overlap_ratio": 0.2222, "tile_spatial_size": 576, "time_n_compress": 4,
    "up_block_types": ["UpDecoderBlock3D"] * 4}
_IMAGE_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.32.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "scaling_factor": 0.18215, "shift_factor": None,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": True, "use_quant_conv": True}


def _require(config: Mapping[str, Any], key: str, allowed: tuple, source: str) -> None:
  if key in config and config[key] not in allowed:
    raise ValueError(f"{source}: unsupported {key}={config[key]!r}; this port supports {allowed}")


def model_from_config(config: Mapping[str, Any], source: str = "config.json", **overrides):
  """Builds our Flax model (`CVVAE` or `ImageVAE`) from an original `config.json` dict.

  `overrides` set module fields such as `dtype` or `remat`.
  """
  cls = config.get("_class_name")
  if cls == "CVVAEModel":
    for key, allowed in (("double_z", (True,)), ("use_3d_conv", (True,)), ("causal_encoder", (True,)),
                         ("causal_decoder", (False,)), ("attn_resolutions", ([],)), ("dropout", (0.0, 0)),
                         ("encoder_attn_type", ("vanilla", "vanilla-xformers")),
                         ("decoder_attn_type", ("spatial-temporal-xformer",)), ("time_n_compress", (4,))):
      _require(config, key, allowed, source)
    ch = int(config.get("ch", 128))
    fields = dict(variant="sd21", block_out_channels=tuple(ch * int(m) for m in config.get("ch_mult", (1, 2, 4, 4))),
                  layers_per_block=int(config.get("num_res_blocks", 2)),
                  latent_channels=int(config.get("z_channels", 4)), in_channels=int(config.get("in_channels", 3)),
                  out_channels=int(config.get("out_ch", 3)), half_3d=bool(config.get("half_3d", True)),
                  scaling_factor=float(config.get("scaling_factor", 0.18215)), shift_factor=0.0)
    model = CVVAE(**{**fields, **overrides})
  elif cls == "CVVAESD3Model":
    for key, allowed in (("double_z", (True,)), ("causal_encoder", (True,)), ("causal_decoder", (False,)),
                         ("act_fn", ("silu",)), ("mid_block_add_attention", (True,)), ("time_n_compress", (4,))):
      _require(config, key, allowed, source)
    fields = dict(variant="sd3", block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
                  layers_per_block=int(config.get("layers_per_block", 2)),
                  latent_channels=int(config.get("out_channels", 16)), in_channels=int(config.get("in_channels", 3)),
                  half_3d=bool(config.get("half_3d", True)), num_groups=int(config.get("norm_num_groups", 32)),
                  scaling_factor=float(config.get("scaling_factor") or SD3_SCALING_FACTOR),
                  shift_factor=float(config.get("shift_factor") or SD3_SHIFT_FACTOR))
    model = CVVAE(**{**fields, **overrides})
  elif cls == "AutoencoderKL":
    for key, allowed in (("act_fn", ("silu",)), ("mid_block_add_attention", (True,))):
      _require(config, key, allowed, source)
    fields = dict(block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
                  layers_per_block=int(config.get("layers_per_block", 2)),
                  latent_channels=int(config.get("latent_channels", 4)), in_channels=int(config.get("in_channels", 3)),
                  out_channels=int(config.get("out_channels", 3)), num_groups=int(config.get("norm_num_groups", 32)),
                  use_quant_conv=bool(config.get("use_quant_conv", True)),
                  use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
                  scaling_factor=float(config.get("scaling_factor") or 0.18215),
                  shift_factor=float(config.get("shift_factor") or 0.0))
    model = ImageVAE(**{**fields, **overrides})
  else:
    raise ValueError(f"{source}: unknown _class_name {cls!r}; expected 'CVVAEModel', 'CVVAESD3Model' or "
                     "'AutoencoderKL'")
  return model


def config_from_model(model) -> dict[str, Any]:
  """The original `config.json` dict for one of our models (the released config with our sizes).

  Keys no weight depends on keep the released values (e.g. the image VAE's `sample_size` is 768).
  """
  if isinstance(model, CVVAE) and model.variant == "sd21":
    ch = model.block_out_channels[0]
    if any(c % ch for c in model.block_out_channels):
      raise ValueError(f"CVVAEModel needs block_out_channels that are multiples of the first, got "
                       f"{model.block_out_channels}")
    cfg = copy.deepcopy(_CVVAE_SD21_CONFIG)
    cfg.update(ch=ch, ch_mult=[c // ch for c in model.block_out_channels], num_res_blocks=model.layers_per_block,
               z_channels=model.latent_channels, in_channels=model.in_channels, out_ch=model.out_channels,
               half_3d=model.half_3d, scaling_factor=model.scaling_factor,
               spatial_n_compress=model.spatial_compression, time_n_compress=model.temporal_compression)
    return cfg
  if isinstance(model, CVVAE) and model.variant == "sd3":
    cfg = copy.deepcopy(_CVVAE_SD3_CONFIG)
    n = len(model.block_out_channels)
    cfg.update(block_out_channels=list(model.block_out_channels), layers_per_block=model.layers_per_block,
               out_channels=model.latent_channels, in_channels=model.in_channels, half_3d=model.half_3d,
               norm_num_groups=model.num_groups, down_block_types=["DownEncoderBlock3D"] * n,
               up_block_types=["UpDecoderBlock3D"] * n, spatial_n_compress=model.spatial_compression,
               time_n_compress=model.temporal_compression)
    if (model.scaling_factor, model.shift_factor) != (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR):
      cfg.update(scaling_factor=model.scaling_factor, shift_factor=model.shift_factor)
    return cfg
  if isinstance(model, ImageVAE):
    if model.padding != "sd":
      raise ValueError(f"only padding='sd' image VAEs exist in PyTorch, got padding={model.padding!r}")
    cfg = copy.deepcopy(_IMAGE_VAE_CONFIG)
    n = len(model.block_out_channels)
    cfg.update(block_out_channels=list(model.block_out_channels), layers_per_block=model.layers_per_block,
               latent_channels=model.latent_channels, in_channels=model.in_channels,
               out_channels=model.out_channels, norm_num_groups=model.num_groups,
               use_quant_conv=model.use_quant_conv, use_post_quant_conv=model.use_post_quant_conv,
               scaling_factor=model.scaling_factor, shift_factor=model.shift_factor or None,
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    return cfg
  raise TypeError(f"expected a CVVAE or ImageVAE, got {type(model).__name__}")


def rules_for(model) -> list[Rule]:
  if isinstance(model, CVVAE) and model.variant == "sd21":
    return ldm_rules(len(model.block_out_channels))
  return diffusers_rules()


def init_shapes(model) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {flax path: ShapeDtypeStruct} of the model's params, without allocating them."""
  sc = model.spatial_compression
  x = jnp.zeros((1, 1, sc, sc, model.in_channels) if isinstance(model, CVVAE) else (1, sc, sc, model.in_channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
  return traverse_util.flatten_dict(shapes, sep="/")


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
  expected = init_shapes(model)
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
  expected = init_shapes(model)
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


# ----------------------------------------------------------------------------------------------------------------
# Folders in the original layout: config.json + diffusion_pytorch_model.safetensors


def is_torch_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def load_torch_folder(path: str, **overrides):
  """Reads an original PyTorch folder -> (model, params). `overrides` set model fields (e.g. dtype)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
  for p in (config_path, weights_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"expected an original PyTorch folder with {CONFIG_NAME} and {WEIGHTS_NAME}; "
                              f"missing {p}")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from e
  model = model_from_config(config, source=config_path, **overrides)
  try:
    state_dict = load_file(weights_path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"cannot read {weights_path} as safetensors: {e}") from e
  bad = [k for k, v in state_dict.items() if v.dtype not in (np.float32, np.float16)]
  if bad:
    raise ConversionError(f"{weights_path}: expected float tensors, got {[(k, state_dict[k].dtype) for k in bad]}")
  return model, torch_to_flax(state_dict, model, source=weights_path)


def save_torch_folder(model, params, path: str) -> str:
  """Writes (model, params) as an original PyTorch folder that the original code loads with strict keys."""
  from safetensors.numpy import save_file

  state_dict = flax_to_torch(params, model)
  os.makedirs(path, exist_ok=True)
  tmp = os.path.join(path, WEIGHTS_NAME + ".tmp")
  save_file(state_dict, tmp)
  os.replace(tmp, os.path.join(path, WEIGHTS_NAME))
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(config_from_model(model), f, indent=2, sort_keys=True)
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cvvae_jax.convert", description=(
      "Convert between the original PyTorch folder layout (config.json + diffusion_pytorch_model.safetensors) "
      "and our Flax/Orbax format. SRC may be either format (or a training workdir, whose latest checkpoint "
      "is used)."))
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--to", choices=("torch", "flax"), required=True)
  args = parser.parse_args(argv)
  from cvvae_jax import pretrained

  model, params = pretrained.load_pretrained(args.src)
  if args.to == "torch":
    save_torch_folder(model, params, args.dst)
  else:
    pretrained.save_flax(model, params, args.dst)
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  print(f"wrote {args.dst} ({args.to}): {type(model).__name__}, {n:,} parameters")


if __name__ == "__main__":
  main()
