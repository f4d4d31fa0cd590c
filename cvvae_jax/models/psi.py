"""The psi mapping: the frames of a clip that each latent frame stands for.

psi maps a clip of T = 1 + 4k frames to the 1 + k frames its latent frames stand for: frame 0 maps to itself, then
one target per group of 4 frames {4i+1, ..., 4i+4} (i = 0 .. k-1). The latent regularizer of training compares the
frozen image decoder's output with these frames, and evaluation scores the compatibility against them.
Pure and jit-able; video `[B, T, H, W, C]` channels-last.
"""
from __future__ import annotations

import enum
from typing import Optional

import einops
import jax
import jax.numpy as jnp

TEMPORAL_COMPRESSION = 4
"""Frames per latent frame after the first (CV-VAE's `temporal_compression`)."""


class PsiMapping(enum.Enum):
  """How psi picks the target frame of each group of `temporal_compression` frames.

  RANDOM: one uniformly random frame of each group, drawn independently per example and per group
    (the paper's best choice, released config `target_type: random`).
  SLICE: the last frame of each group, frame 4i + 4, i.e. frames 0, 4, 8, ... (the original's
    `inputs[:, :, ::4]`).
  MEAN: the average of the group's frames.
  FIRST: frame 0 only; the output has a single frame `[B, 1, H, W, C]` (see `psi`).
  """

  RANDOM = "random"
  SLICE = "slice"
  MEAN = "mean"
  FIRST = "first"

  @classmethod
  def parse(cls, value: "str | PsiMapping") -> "PsiMapping":
    """Parses a config string (case-insensitive) once into the enum; a `PsiMapping` passes through."""
    if isinstance(value, cls):
      return value
    if isinstance(value, str):
      try:
        return cls(value.strip().lower())
      except ValueError:
        pass
    raise ValueError(
      f"expected a psi mapping, one of {[m.value for m in cls]}, got {value!r}"
    )


def check_mapping(mapping) -> PsiMapping:
  if not isinstance(mapping, PsiMapping):
    raise TypeError(
      f"expected a PsiMapping (parse the config string once with PsiMapping.parse), "
      f"got {type(mapping).__name__} {mapping!r}"
    )
  return mapping


def frame_groups(video: jax.Array, temporal_compression: int, name: str = "video") -> int:
  """Checks `video` is `[B, 1 + n*k, H, W, C]` and returns k."""
  if video.ndim != 5:
    raise ValueError(
      f"expected {name} of shape [B, T, H, W, C] (5 dims), got shape {tuple(video.shape)}"
    )
  t = video.shape[1]
  if t < 1 or (t - 1) % temporal_compression != 0:
    raise ValueError(
      f"expected {name} with T = 1 + {temporal_compression}k frames, got T={t}"
    )
  return (t - 1) // temporal_compression


def psi_num_frames(num_frames: int, mapping: PsiMapping, temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
  """Number of target frames psi gives for a clip of `num_frames` = 1 + 4k frames: 1 + k, or 1 for FIRST."""
  mapping = check_mapping(mapping)
  if num_frames < 1 or (num_frames - 1) % temporal_compression != 0:
    raise ValueError(f"expected T = 1 + {temporal_compression}k frames, got T={num_frames}")
  if mapping is PsiMapping.FIRST:
    return 1
  return 1 + (num_frames - 1) // temporal_compression


def psi(
  video: jax.Array,
  mapping: PsiMapping,
  rng: Optional[jax.Array] = None,
  *,
  temporal_compression: int = TEMPORAL_COMPRESSION,
) -> jax.Array:
  """Maps a clip to the frames its latent frames stand for.

  Args:
      video: `[B, 1+4k, H, W, C]` (any float dtype; values are not changed except by MEAN's average).
      mapping: a `PsiMapping`. Frame 0 always maps to itself. For group i (frames 4i+1 .. 4i+4):
    RANDOM picks one frame uniformly at random, independently per example (the original draws one set
    of indices shared by the whole batch; per-example draws give more variety for the same cost);
    SLICE picks frame 4i+4 (the last of the group, as the original's `x[:, :, ::4]`);
    MEAN averages the group; FIRST keeps frame 0 only.
      rng: a PRNG key, required for RANDOM, ignored otherwise.
      temporal_compression: group size (4 in CV-VAE).

  Returns:
      `[B, 1+k, H, W, C]`; for FIRST `[B, 1, H, W, C]` (frame 0 only). As in the original's first-frame
      experiment (commented out in `LPIPSWithDiscriminatorAndDomainConstraint.forward`), FIRST is compared
      only with the decode of latent frame 0; `decoder_regularization` does that.
  """
  mapping = check_mapping(mapping)
  k = frame_groups(video, temporal_compression)
  n = temporal_compression
  if mapping is PsiMapping.FIRST:
    return video[:, :1]
  if mapping is PsiMapping.SLICE:
    return video[:, ::n]
  if mapping is PsiMapping.MEAN:
    groups = einops.rearrange(video[:, 1:], "b (k n) h w c -> b k n h w c", n=n)
    return jnp.concatenate([video[:, :1], groups.mean(axis=2).astype(video.dtype)], axis=1)
  # RANDOM
  if rng is None:
    raise ValueError("expected a PRNG key `rng` for PsiMapping.RANDOM, got None")
  b = video.shape[0]
  offsets = jax.random.randint(rng, (b, k), 1, n + 1)  # 1 .. n within each group
  indices = jnp.concatenate(
    [jnp.zeros((b, 1), offsets.dtype), offsets + n * jnp.arange(k, dtype=offsets.dtype)], axis=1
  )  # [B, 1+k]
  return jnp.take_along_axis(video, indices[:, :, None, None, None], axis=1)
