"""Inflation: CV-VAE params from SD image-VAE params (the paper's initialization).

Every 2D kernel goes into one temporal tap of the matching 3D kernel, the other taps are zero:
  * causal encoder convs: the **last** tap (it sees the current frame; the front padding replicates frame 0);
  * non-causal decoder convs: the **centre** tap;
  * the decoder's time-upsampling conv (2C outputs = two frames): the 2D kernel and bias in **both** channel
    groups, so each input frame is repeated.
Per-frame 2D convs, norms and the spatial attention are copied unchanged. The image VAE's 1x1 `quant_conv` is
folded into the encoder's `conv_out` and its `post_quant_conv` into the decoder's `conv_in`. New temporal-attention
params (SD2.1 decoder) get a zero output projection, so the whole mid-attention block starts as the identity.

What this reproduces on single frames (T = 1), checked in tests/test_inflate.py:
  * the encoder exactly (to float rounding), given equal GroupNorm eps (CV-VAE SD2.1 uses 1e-5, the image VAE
    1e-6: a ~1e-4 relative difference) and, for the SD3 variant, equal padding (CV-VAE SD3 pads by replicate and
    downsamples symmetrically, the image VAE pads zeros asymmetrically: the borders differ);
  * the decoder exactly except (a) the post-quant bias, which folds exactly only away from the latent's border
    (conv_in zero-pads the biased latent in the original), and (b) the SD2.1 decoder's mid attention: its temporal
    half has no image counterpart and no residual of its own (x + temporal(spatial(x))), so no initialization makes
    it reproduce `x + spatial(x)`; a zero temporal output projection gives `x`, i.e. the inflated decoder starts
    without the image decoder's mid-attention contribution and learns the temporal attention in training.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvvae_jax.models import registry
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE


class InflationError(ValueError):
  """Image-VAE params that do not fit the CV-VAE; the message lists every problem."""


def _check_compatible(image_vae: ImageVAE, video_vae: CVVAE) -> None:
  problems = []
  for field in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                "num_groups"):
    a, b = tuple(np.atleast_1d(getattr(image_vae, field))), tuple(np.atleast_1d(getattr(video_vae, field)))
    if a != b:
      problems.append(f"{field}: image VAE {getattr(image_vae, field)} vs CV-VAE {getattr(video_vae, field)}")
  if problems:
    raise InflationError("cannot inflate: the image VAE and the CV-VAE differ in " + "; ".join(problems))


def _to_taps(kernel_2d: np.ndarray, taps: int, tap: int) -> np.ndarray:
  """[kh, kw, I, O] -> [taps, kh, kw, I, O] with the 2D kernel at `tap` and zeros elsewhere."""
  out = np.zeros((taps,) + kernel_2d.shape, kernel_2d.dtype)
  out[tap] = kernel_2d
  return out


def inflate_params(image_params: Mapping, image_vae: ImageVAE, video_vae: CVVAE,
                   rng: jax.Array | None = None) -> dict:
  """Image-VAE `params` -> CV-VAE `params` (see the module docstring). Strict: every image parameter is used
  (quant convs by folding), every CV-VAE parameter is filled, shapes are checked.

  `rng` initialises the new temporal-attention q/k/v (the SD2.1 decoder); default PRNGKey(0).
  """
  _check_compatible(image_vae, video_vae)
  src = {k: np.asarray(jax.device_get(v), np.float32)
         for k, v in traverse_util.flatten_dict(dict(image_params), sep="/").items()}
  expected = registry.param_shapes(video_vae)
  fresh = traverse_util.flatten_dict(jax.jit(video_vae.init)(
      rng if rng is not None else jax.random.PRNGKey(0), registry.example_input(video_vae))["params"], sep="/")
  used, out, problems = set(), {}, []

  def take(path: str) -> np.ndarray:
    if path not in src:
      raise InflationError(f"image VAE params have no {path}")
    used.add(path)
    return src[path]

  for path, spec in expected.items():
    want = tuple(spec.shape)
    side = path.split("/")[0]
    try:
      if "/mid/attn/temporal/" in path:
        value = np.asarray(fresh[path], np.float32)
        if "/proj_out/" in path:
          value = np.zeros(want, np.float32)
      elif path == "encoder/conv_out/kernel" and image_vae.use_quant_conv:
        q = take("quant_conv/kernel")[0, 0]                                  # [2C, 2C]
        value = np.einsum("...j,jo->...o", _lift(take(path), want, side), q)
      elif path == "encoder/conv_out/bias" and image_vae.use_quant_conv:
        value = take(path) @ take("quant_conv/kernel")[0, 0] + take("quant_conv/bias")
      elif path == "decoder/conv_in/kernel" and image_vae.use_post_quant_conv:
        p = take("post_quant_conv/kernel")[0, 0]                             # [C, C] (in, out)
        value = np.einsum("ij,...jo->...io", p, _lift(take(path), want, side))
      elif path == "decoder/conv_in/bias" and image_vae.use_post_quant_conv:
        kernel = _lift(take("decoder/conv_in/kernel"), expected["decoder/conv_in/kernel"].shape, side)
        taps_in_out = kernel.reshape(-1, *kernel.shape[-2:])                 # [taps, C, O]
        value = take(path) + np.einsum("j,tjo->o", take("post_quant_conv/bias"), taps_in_out)
      elif path.endswith("/upsample/conv/kernel") or path.endswith("/upsample/conv/bias"):
        value = take(path)
        if path.endswith("kernel"):
          value = _lift(value, want[:-1] + value.shape[-1:], side)
        factor = want[-1] // value.shape[-1]
        value = np.concatenate([value] * factor, axis=-1)                   # both frames of depth-to-time
      else:
        value = _lift(take(path), want, side)
    except InflationError as e:
      problems.append(str(e))
      continue
    if tuple(value.shape) != want:
      problems.append(f"{path}: inflated shape {tuple(value.shape)}, CV-VAE expects {want}")
      continue
    out[path] = value.astype(np.float32)
  unused = sorted(set(src) - used)
  if unused:
    problems.append(f"image VAE params not used by the CV-VAE: {unused}")
  if problems:
    raise InflationError("cannot inflate image-VAE params:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in out.items()}, sep="/")


def _lift(value: np.ndarray, want: tuple[int, ...], side: str) -> np.ndarray:
  """Lifts a 2D conv kernel to 3D (the encoder's last tap, the decoder's centre tap); others pass through."""
  want = tuple(want)
  if value.ndim == len(want) - 1 and len(want) == 5:
    taps = want[0]
    return _to_taps(value, taps, taps - 1 if side == "encoder" else taps // 2)
  return value
