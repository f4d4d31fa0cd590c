"""The model registry: model spec <-> module, `config.model` -> module, abstract parameter shapes, dtypes.

A model *spec* is the JSON-able architecture of a `CVVAE` or `ImageVAE`, `{"class": "CVVAE", "fields": {...}}`,
stored in our Flax exports (`model.json`) and in training checkpoints; run-time choices (`RUNTIME_FIELDS`: compute
dtype, remat, ...) are not part of it. A training config names its model by `kind` ("cvvae" | "image_vae") beside the
module's fields (`config.model`).

    spec = registry.model_spec(vae)              # -> {"class": "CVVAE", "fields": {"variant": "sd21", ...}}
    vae = registry.model_from_spec(spec, dtype=jnp.bfloat16)
    shapes = registry.param_shapes(vae)          # {"encoder/conv_in/kernel": ShapeDtypeStruct, ...}, no allocation
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cvvae_jax.models.conv_impl import resolve_conv_impl
from cvvae_jax.models.discriminator import PatchDiscriminator3D
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE

MODEL_CLASSES = {"CVVAE": CVVAE, "ImageVAE": ImageVAE}
KINDS = {"cvvae": CVVAE, "image_vae": ImageVAE}  # config.model.kind
# Run-time choices, not architecture: never stored in a spec, settable as overrides.
RUNTIME_FIELDS = ("dtype", "param_dtype", "precision", "remat", "conv_impl", "upsample_impl", "activation_sharding",
                  "parent", "name")
# Fields of a spec that change no parameter: how the original code tiles the model (inference settings).
TILING_FIELDS = ("original_tile_size", "original_tile_overlap", "original_round_frames")
# Compute dtypes by name (params stay float32).
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def check_model(model: Any) -> None:
  """Raises TypeError unless `model` is a `CVVAE` or an `ImageVAE`."""
  if not isinstance(model, (CVVAE, ImageVAE)):
    raise TypeError(f"expected a CVVAE or ImageVAE, got {type(model).__name__}")


def _tuples(fields: Mapping[str, Any]) -> dict[str, Any]:
  """JSON / ConfigDict lists back to the tuples module fields hold."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def model_spec(model: CVVAE | ImageVAE) -> dict[str, Any]:
  """The JSON-able description of a model's architecture: {"class": ..., "fields": {...}}."""
  check_model(model)
  fields = {}
  for f in dataclasses.fields(model):
    if f.name in RUNTIME_FIELDS:
      continue
    value = getattr(model, f.name)
    fields[f.name] = list(value) if isinstance(value, tuple) else value
  return {"class": type(model).__name__, "fields": fields}


def architecture(model: CVVAE | ImageVAE) -> dict[str, Any]:
  """`model_spec` without `TILING_FIELDS`: what the params depend on (two models of one architecture share them)."""
  spec = model_spec(model)
  return {**spec, "fields": {k: v for k, v in spec["fields"].items() if k not in TILING_FIELDS}}


def model_from_spec(spec: Mapping[str, Any], **overrides) -> CVVAE | ImageVAE:
  """The module a spec describes; `overrides` set run-time fields (e.g. `dtype=jnp.bfloat16`, `conv_impl="xla"`).

  Run-time fields a spec leaves out (older specs have no `conv_impl`) take the module's defaults ("auto")."""
  cls = MODEL_CLASSES.get(spec.get("class"))
  if cls is None:
    raise ValueError(f"unknown model class {spec.get('class')!r}; expected one of {sorted(MODEL_CLASSES)}")
  return cls(**_tuples(spec["fields"]), **overrides)


def build_model(model_cfg: Mapping[str, Any], **overrides) -> CVVAE | ImageVAE:
  """`config.model` -> CVVAE or ImageVAE: its `kind` picks the class, the other entries are the module's fields."""
  fields = dict(model_cfg)
  kind = fields.pop("kind", None)
  if kind not in KINDS:
    raise ValueError(f"config.model.kind: expected one of {sorted(KINDS)}, got {kind!r}")
  return KINDS[kind](**_tuples(fields), **overrides)


def parse_dtype(name: Any, field: str = "dtype") -> Any:
  """A compute dtype by name ("float32", "bfloat16", or the short "fp32", "bf16"); a jnp dtype passes through."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"{field}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def with_dtype(model: nn.Module, dtype: Any = None) -> nn.Module:
  """The model computing in `dtype` (a name as `parse_dtype` takes, a jnp dtype, or None: unchanged)."""
  if dtype is None:
    return model
  dtype = parse_dtype(dtype)
  return model.clone(dtype=dtype) if model.dtype != dtype else model


def with_conv_impl(model: nn.Module, conv_impl: str | None = None) -> nn.Module:
  """The model computing its convolutions with `conv_impl` (a `conv_impl.CONV_IMPLS` name; None: unchanged)."""
  if conv_impl is None:
    return model
  resolve_conv_impl(conv_impl)  # a bad name is an error here, not at trace time
  return model.clone(conv_impl=conv_impl) if model.conv_impl != conv_impl else model


def example_input(model: nn.Module) -> jax.Array:
  """The smallest input `model.init` accepts (zeros): a 1-frame video for CV-VAE `[1, 1, s, s, C]`, an image for
  the image VAE `[1, s, s, C]` (s the spatial compression), a 1-frame clip for the discriminator."""
  if isinstance(model, CVVAE):
    sc = model.spatial_compression
    return jnp.zeros((1, 1, sc, sc, model.in_channels), jnp.float32)
  if isinstance(model, ImageVAE):
    sc = model.spatial_compression
    return jnp.zeros((1, sc, sc, model.in_channels), jnp.float32)
  if isinstance(model, PatchDiscriminator3D):
    size = 2 ** (model.n_layers + 2)  # survives the stride-2 conv_in and the n_layers - 2 poolings
    return jnp.zeros((1, 1, size, size, 3), jnp.float32)
  raise TypeError(f"expected a CVVAE, ImageVAE or PatchDiscriminator3D, got {type(model).__name__}")


def param_shapes(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {"a/b/kernel": ShapeDtypeStruct} of the model's params, without allocating them."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example_input(model)))["params"]
  return traverse_util.flatten_dict(shapes, sep="/")


# Parameter dtypes by name (`load_pretrained(..., param_dtype=...)`).
PARAM_DTYPES = {**DTYPES, "float16": jnp.float16, "fp16": jnp.float16}


def parse_param_dtype(name: Any) -> Any:
  """A parameter dtype: float32 (the default), bfloat16 or float16, by name (as in `PARAM_DTYPES`) or as a dtype."""
  dtype = PARAM_DTYPES.get(name) if isinstance(name, str) else name
  try:
    ok = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                    jnp.dtype(jnp.float16))
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"param_dtype: expected float32, bfloat16 or float16 (or one of {sorted(PARAM_DTYPES)}), "
                     f"got {name!r}")
  return dtype
