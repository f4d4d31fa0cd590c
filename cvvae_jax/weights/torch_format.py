"""The original PyTorch folder format: `config.json` + `diffusion_pytorch_model.safetensors`, read and written.

`model_from_config` / `config_from_model` map an original `config.json` (`CVVAEModel`, `CVVAESD3Model`, diffusers
`AutoencoderKL`) to our module and back; `load_torch_folder` / `save_torch_folder` read and write a whole folder
through the strict rule tables of `convert.py`. Which weight files a folder holds (variants such as fp16, shards,
float32 / float16 / bfloat16 tensors) is `weight_files.py`'s business; files are read and written with
`safetensors.numpy`: no torch needed.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.weights import weight_files
from cvvae_jax.weights.convert import flax_to_torch, torch_to_flax

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "SD3_SCALING_FACTOR", "SD3_SHIFT_FACTOR", "model_from_config",
           "config_from_model", "is_torch_folder", "load_torch_folder", "save_torch_folder"]

WEIGHTS_NAME = weight_files.WEIGHTS_NAME
CONFIG_NAME = "config.json"
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


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


# The original code's tiling keys, their defaults in its constructors, and our CVVAE fields.
_TILING_KEYS = (("tile_spatial_size", 576, "original_tile_size"),
                ("tile_overlap_ratio", 0.2222, "original_tile_overlap"),
                ("en_de_n_frames_a_time", 16, "original_round_frames"))


def _original_tiling(config: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The CVVAE fields of a config's tiling keys (absent: the original's defaults; null: no tiling / chunking)."""
  tile, overlap, frames = (config.get(key, default) for key, default, _ in _TILING_KEYS)
  tc = int(config.get("time_n_compress", 4))
  if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 1):
    raise ValueError(f"{source}: tile_spatial_size must be a positive int of pixels or null, got {tile!r}")
  if tile is not None and (not isinstance(overlap, (int, float)) or not 0 <= overlap < 0.5):
    raise ValueError(f"{source}: tile_overlap_ratio must be a number in [0, 0.5) when tile_spatial_size is set, got "
                     f"{overlap!r}")
  if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < tc or frames % tc):
    raise ValueError(f"{source}: en_de_n_frames_a_time must be a positive multiple of time_n_compress={tc} or null, "
                     f"got {frames!r}")
  return {"original_tile_size": tile, "original_tile_overlap": None if overlap is None else float(overlap),
          "original_round_frames": frames}


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
                  scaling_factor=float(config.get("scaling_factor", 0.18215)), shift_factor=0.0,
                  **_original_tiling(config, source))
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
                  shift_factor=float(config.get("shift_factor") or SD3_SHIFT_FACTOR),
                  **_original_tiling(config, source))
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
               spatial_n_compress=model.spatial_compression, time_n_compress=model.temporal_compression,
               **{key: getattr(model, field) for key, _, field in _TILING_KEYS})
    return cfg
  if isinstance(model, CVVAE) and model.variant == "sd3":
    cfg = copy.deepcopy(_CVVAE_SD3_CONFIG)
    n = len(model.block_out_channels)
    cfg.update(block_out_channels=list(model.block_out_channels), layers_per_block=model.layers_per_block,
               out_channels=model.latent_channels, in_channels=model.in_channels, half_3d=model.half_3d,
               norm_num_groups=model.num_groups, down_block_types=["DownEncoderBlock3D"] * n,
               up_block_types=["UpDecoderBlock3D"] * n, spatial_n_compress=model.spatial_compression,
               time_n_compress=model.temporal_compression,
               **{key: getattr(model, field) for key, _, field in _TILING_KEYS})
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


# ----------------------------------------------------------------------------------------------------------------
# Folders in the original layout: config.json + diffusion_pytorch_model[.<variant>].safetensors (or shards)


def is_torch_folder(path: str) -> bool:
  """A folder with `config.json` and a weights file of any kind `weight_files` knows (pickles included, so that
  loading names them)."""
  return os.path.isfile(os.path.join(path, CONFIG_NAME)) and weight_files.has_weights(path)


def load_torch_folder(path: str, variant: str | None = None, **overrides):
  """Reads an original PyTorch folder -> (model, params).

  `variant` picks `diffusion_pytorch_model.<variant>.safetensors` (or its shard index), as diffusers'
  `from_pretrained(variant=...)`. The file may hold float32, float16 or bfloat16 tensors; params come out in the
  model's `param_dtype` (float32 unless `overrides` say `param_dtype=...`). `overrides` set model fields.
  """
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"expected an original PyTorch folder with {CONFIG_NAME} and "
                            f"{weight_files.weights_name(variant)}; missing {config_path}")
  found = weight_files.find_weights(path, variant)
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from e
  model = model_from_config(config, source=config_path, **overrides)
  state_dict = weight_files.read_state_dict(found)
  return model, torch_to_flax(state_dict, model, source=found.name)


def save_torch_folder(model, params, path: str, dtype: Any = None, variant: str | None = None) -> str:
  """Writes (model, params) as an original PyTorch folder that the original code loads with strict keys.

  `dtype` (None: float32; "float16"/"fp16", "bfloat16"/"bf16" or a dtype) is the dtype of the written tensors
  (rounded to nearest even); `variant` names the file `diffusion_pytorch_model.<variant>.safetensors`.
  """
  dtype = weight_files.parse_save_dtype(dtype)
  weight_files.check_variant(variant)
  state_dict = flax_to_torch(params, model)
  weight_files.write_state_dict(state_dict, path, dtype=dtype, variant=variant)
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(config_from_model(model), f, indent=2, sort_keys=True)
  return path
