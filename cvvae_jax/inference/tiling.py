"""Running an encode or decode function over a `plan.Plan`: chunks in time, tiles in space, written once.

Everything here is a function of `fn(params, x) -> y` on 5D arrays `[B, t, H, W, C]` plus a `plan.Geometry`, so one
implementation serves the CV-VAE encoder and decoder (video mode) and per-frame image coders. `apply` is pure and
traceable (use it under `jax.jit`, also with sharding); `apply_streaming` loops on the host chunk by chunk.

Memory: `apply` (traced) holds the input, the output and one chunk's intermediates; `apply_streaming` (host loop)
keeps input and output on the host and one chunk on the device, and never builds a full-video intermediate.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cvvae_jax.inference.plan import Geometry, Mode, Plan, Span, SpatialPlan, blend_windows

__all__ = ["TileFn", "blend_original", "spatial_original", "spatial_tiled", "apply_spatial", "apply",
           "apply_streaming", "chunk_progress"]

Array = Any  # jax.Array or np.ndarray
TileFn = Callable[[Any, jax.Array], jax.Array]  # fn(params, x [B, t, H, W, C]) -> y [B, t', H', W', C']


# ----------------------------------------------------------------------------------------------------------------
# Blending in the original's way (sequential, in place, then crop): numpy or jax.numpy.


def _blend_original(a: Array, b: Array, overlap: int, axis: int, xp) -> Array:
  """b's first `overlap` entries along `axis` <- (1 - w) a's last ones + w b's, w = k / overlap."""
  shape = [1] * b.ndim
  shape[axis] = overlap
  w = (xp.arange(overlap, dtype=np.float32) / np.float32(overlap)).reshape(shape)
  head = [slice(None)] * b.ndim
  head[axis] = slice(0, overlap)
  tail_a = [slice(None)] * a.ndim
  tail_a[axis] = slice(a.shape[axis] - overlap, a.shape[axis])
  rest = [slice(None)] * b.ndim
  rest[axis] = slice(overlap, None)
  mixed = (1 - w) * a[tuple(tail_a)] + w * b[tuple(head)]
  return xp.concatenate([mixed.astype(b.dtype), b[tuple(rest)]], axis=axis)


def blend_original(grid: Sequence[Sequence[Array]], overlap: int, stride: int, xp=np) -> Array:
  """The original's `blend_v`/`blend_h` loop and crop over a grid of tile outputs `[B, t, h, w, C]` (row-major).

  For each tile: blend its top `overlap` rows with the (already blended) tile above, then its left `overlap` columns
  with the (already blended) tile to the left; crop every tile but the last in its row/column to `stride`;
  concatenate. `overlap` and `stride` are in output units.
  """
  rows = [list(r) for r in grid]
  for i in range(len(rows)):
    for j in range(len(rows[i])):
      tile = rows[i][j]
      if i > 0:
        tile = _blend_original(rows[i - 1][j], tile, overlap, 2, xp)
      if j > 0:
        tile = _blend_original(rows[i][j - 1], tile, overlap, 3, xp)
      rows[i][j] = tile
  out_rows = []
  for i, r in enumerate(rows):
    cols = []
    for j, tile in enumerate(r):
      if i < len(rows) - 1:
        tile = tile[:, :, :stride]
      if j < len(r) - 1:
        tile = tile[:, :, :, :stride]
      cols.append(tile)
    out_rows.append(xp.concatenate(cols, axis=3))
  return xp.concatenate(out_rows, axis=2)


# ----------------------------------------------------------------------------------------------------------------
# Execution: space (one chunk).


def _tile_input(x: Array, row: Span, col: Span, geometry: Geometry) -> Array:
  (y0, hh), (x0, ww) = row.pixels(geometry.space_in), col.pixels(geometry.space_in)
  return x[:, :, y0:y0 + hh, x0:x0 + ww]


def spatial_original(fn: TileFn, params, x: Array, space: SpatialPlan, geometry: Geometry, xp=jnp) -> Array:
  """ORIGINAL tiles of one chunk: a Python loop over tiles, then `blend_original` (unrolled when traced)."""
  grid = [[fn(params, _tile_input(x, r, c, geometry)) for c in space.cols] for r in space.rows]
  if space.num_tiles == 1:
    return grid[0][0]
  if xp is np:
    grid = [[np.asarray(t) for t in row] for row in grid]
  tile = max(r.size for r in space.rows + space.cols)
  so = geometry.space_out
  return blend_original(grid, so * (tile - space.stride), so * space.stride, xp)


def spatial_tiled(fn: TileFn, params, x: jax.Array, space: SpatialPlan, geometry: Geometry) -> jax.Array:
  """TILED tiles of one chunk `[B, t, H, W, C]`: `lax.scan` over equal tiles, cross-fade accumulated in float32."""
  if space.num_tiles == 1:
    return fn(params, x)
  si, so = geometry.space_in, geometry.space_out
  th, tw = space.rows[0].size, space.cols[0].size
  tile_shape = (x.shape[0], x.shape[1], th * si, tw * si, x.shape[4])
  y_struct = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(tile_shape, x.dtype))
  out_h, out_w = space.rows[-1].end * so, space.cols[-1].end * so
  out = jnp.zeros((*y_struct.shape[:2], out_h, out_w, y_struct.shape[4]), jnp.float32)
  wy, wx = blend_windows(space.rows, so), blend_windows(space.cols, so)
  ii, jj = np.meshgrid(np.arange(len(space.rows)), np.arange(len(space.cols)), indexing="ij")
  ii, jj = ii.ravel(), jj.ravel()
  starts_y = np.array([r.start for r in space.rows], np.int32)[ii]
  starts_x = np.array([c.start for c in space.cols], np.int32)[jj]

  def body(out, xs):
    sy, sx, wyi, wxi = xs
    tile = lax.dynamic_slice(x, (0, 0, sy * si, sx * si, 0), tile_shape)
    y = fn(params, tile).astype(jnp.float32)
    w = (wyi[:, None] * wxi[None, :])[None, None, :, :, None]
    at = (0, 0, sy * so, sx * so, 0)
    current = lax.dynamic_slice(out, at, y.shape)
    return lax.dynamic_update_slice(out, current + w * y, at), None

  out, _ = lax.scan(body, out, (starts_y, starts_x, wy[ii], wx[jj]))
  return out.astype(y_struct.dtype)


def apply_spatial(fn: TileFn, params, x: Array, space: SpatialPlan, geometry: Geometry) -> jax.Array:
  """One chunk `[B, t, H, W, C]` through `fn`, tiled in space as `space` says (traceable)."""
  if space.mode is Mode.ORIGINAL:
    return spatial_original(fn, params, x, space, geometry, jnp)
  return spatial_tiled(fn, params, x, space, geometry)


# ----------------------------------------------------------------------------------------------------------------
# Execution: time.


def _kept(spans: Sequence[Span], geometry: Geometry):
  """Per chunk: (input frames (start, size), output frames (start, size), first output index kept).

  Later chunks keep only the outputs that no earlier chunk produced (the original drops the first latent / frame).
  """
  done = 0
  for s in spans:
    t_in, t_out = s.frames(geometry.time_in), s.frames(geometry.time_out)
    keep = max(done - t_out[0], 0)
    yield t_in, t_out, keep
    done = max(done, t_out[0] + t_out[1])


def apply(fn: TileFn, params, x: jax.Array, plan: Plan, geometry: Geometry) -> jax.Array:
  """`fn` over `x` `[B, T, H, W, C]` as `plan` says; pure and traceable (use under `jax.jit`, also with sharding).

  TILED/EXACT: `lax.scan` over the (equal) chunks, last chunk first, so that earlier chunks overwrite the outputs
  they share with later ones; one compiled copy of `fn`. ORIGINAL: Python loops (one copy of `fn` per tile and
  chunk; prefer `apply_streaming` for big inputs). Returns `[B, T', H', W', C']`.
  """
  spans, space = plan.time, plan.space
  if len(spans) == 1:
    return apply_spatial(fn, params, x, space, geometry)
  if space.mode is Mode.ORIGINAL:
    parts = []
    for (a, n), _, keep in _kept(spans, geometry):
      parts.append(apply_spatial(fn, params, x[:, a:a + n], space, geometry)[:, keep:])
    return jnp.concatenate(parts, axis=1)
  sizes = {s.size for s in spans}
  if len(sizes) != 1:
    raise ValueError(f"TILED/EXACT chunks must be equal, got sizes {sorted(sizes)}")
  _, n_in = spans[0].frames(geometry.time_in)
  chunk_shape = (x.shape[0], n_in, *x.shape[2:])
  y_struct = jax.eval_shape(lambda p, c: apply_spatial(fn, p, c, space, geometry), params,
                            jax.ShapeDtypeStruct(chunk_shape, x.dtype))
  out = jnp.zeros(geometry.out_shape(plan.grid, x.shape[0], y_struct.shape[-1]), y_struct.dtype)
  starts_in = np.array([s.frames(geometry.time_in)[0] for s in spans][::-1], np.int32)
  starts_out = np.array([s.frames(geometry.time_out)[0] for s in spans][::-1], np.int32)

  def body(out, xs):
    a, b = xs
    chunk = lax.dynamic_slice(x, (0, a, 0, 0, 0), chunk_shape)
    y = apply_spatial(fn, params, chunk, space, geometry)
    return lax.dynamic_update_slice(out, y.astype(out.dtype), (0, b, 0, 0, 0)), None

  out, _ = lax.scan(body, out, (starts_in, starts_out))
  return out


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _jit_spatial(fn, params, x, space, geometry):
  return apply_spatial(fn, params, x, space, geometry)


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_fn(fn, params, x):
  return fn(params, x)


def apply_streaming(fn: TileFn, params, x: Array, plan: Plan, geometry: Geometry,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """`fn` over `x` `[B, T, H, W, C]` (numpy or jax) chunk by chunk from the host; returns a numpy array.

  Only one chunk is on the device at a time; the output is filled in place on the host. `fn` must be hashable (a
  module-level function or a frozen dataclass, not a fresh lambda) so that its compilation is reused: across the
  chunks of one call and across calls. TILED/EXACT compile once per chunk shape (one shape for any video at least a
  chunk long); ORIGINAL once per tile shape (at most 8). `progress(done, total)` is called after every chunk.
  """
  spans, space = plan.time, plan.space
  out = None
  for done, ((a, n), (b, m), keep) in enumerate(_kept(spans, geometry), start=1):
    chunk = x[:, a:a + n]
    if space.mode is Mode.ORIGINAL:
      y = spatial_original(functools.partial(_jit_fn, fn), params, chunk, space, geometry, np)
    else:
      y = _jit_spatial(fn, params, chunk, space, geometry)
    y = np.asarray(y)
    if out is None:
      out = np.empty(geometry.out_shape(plan.grid, x.shape[0], y.shape[-1]), y.dtype)
    if y.shape[1] != m:
      raise AssertionError(f"chunk produced {y.shape[1]} frames, expected {m}")
    out[:, b + keep:b + m] = y[:, keep:]
    if progress is not None:
      progress(done, len(spans))
  return out


def chunk_progress(label: str, stream=None) -> Callable[[int, int], None]:
  """A `progress` for `apply_streaming` that prints `label: chunk i/n, s per chunk, ETA` (to stderr by default).

  The first chunk's time includes the compilation; the rate is that of the chunks so far.
  """
  start = time.perf_counter()

  def report(done: int, total: int) -> None:
    per_chunk = (time.perf_counter() - start) / done
    print(f"{label}: chunk {done}/{total}, {per_chunk:.1f} s per chunk, ETA {per_chunk * (total - done):.0f} s",
          file=stream or sys.stderr, flush=True)

  return report
