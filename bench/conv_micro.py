"""Micro-benchmarks of 3x3 convolution formulations on the VAE's real shapes (XLA:CPU, fp32, jitted).

    python bench/conv_micro.py --exp conv3x3 [--shape 1,256,256,128,128] [--repeats 7] [--grad]
    python bench/conv_micro.py --exp upsample [--shape 1,128,128,256] [--video_t 0] [--grad]
    python bench/conv_micro.py --exp model --model image|cvvae --shape 1,256,256,3 [--direction decode]
    python bench/conv_micro.py --exp vs_torch --shape 1,256,256,128,128   # XLA conv vs torch conv2d, one process
    python bench/conv_micro.py --exp conv3d --shape 1,17,128,128,128,128 [--grad]   # 3x3x3: tap form vs frame loop

Every variant is compiled first, then the variants are called in turn (A B C A B C ...) `--repeats` times in one
process, so that load from other jobs on the machine hits all of them alike; the JSON line per variant gives the best
and median time and their ratio to the first (reference) variant. `--grad` times the VJP (d input and d kernel)
instead of the forward pass. `--exp model` times a whole full-size model (random weights) with `Upsample` as now
("phase") against the nearest-repeat formulation it replaced ("repeat"). `--exp vs_torch` alternates XLA's 3x3
convolution with torch's `conv2d` (NCHW and channels-last, `torch.set_num_threads(2)`) in the same process.
`--exp conv3d` times one causal (replicate) 3x3x3 convolution `[B, T, H, W, C] -> [..., O]` as one batched 2D
convolution per time tap ("taps", `conv_impl="cpu_taps"`) against one output frame at a time ("frame_loop",
`cpu_frames`, with the taps' gradient) and XLA's 3D convolution ("xla").
Results are checked against the reference (max abs difference printed); each row has XLA's temp memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cvvae_jax.models import conv_ops, cpu_conv, layers  # noqa: E402
from tests.helpers import random_params  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_lax(x, k):
  """Reference: `lax.conv_general_dilated`, 'same' zero padding. x `[B, H, W, C]`, k `[3, 3, C, O]`."""
  return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def conv_im2col_w(x, k):
  """Width taps folded into channels: concat of 3 width shifts `[B, H, W, 3C]`, then a 3x1 conv."""
  c, o = k.shape[2:]
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  w = x.shape[2]
  cols = jnp.concatenate([xp[:, :, j:j + w] for j in range(3)], axis=-1)
  return lax.conv_general_dilated(cols, k.reshape(3, 1, 3 * c, o), (1, 1), ((1, 1), (0, 0)), dimension_numbers=NHWC)


def conv_im2col_full(x, k):
  """Full im2col `[B*H*W, 9C]` @ `[9C, O]`."""
  b, h, w, c = x.shape
  o = k.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
  return (cols.reshape(-1, 9 * c) @ k.reshape(9 * c, o)).reshape(b, h, w, o)


def conv_taps_dot(x, k):
  """Sum over the 9 taps of (shifted input) @ kernel[tap]."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = 0
  for i in range(3):
    for j in range(3):
      y = y + jnp.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], k[i, j])
  return y


def conv_rows_dot(x, k):
  """Row taps as 3 dots on the padded input flattened over (H, W+2): out[r] = sum_i,j xflat[r + i*(W+2) + j] @ k[i,j],
  one dot of `[.., 3C]` x `[3C, O]` per row tap (width taps via 3 shifted views concatenated)."""
  b, h, w, c = x.shape
  o = k.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = 0
  for i in range(3):
    rows = xp[:, i:i + h]
    cols = jnp.concatenate([rows[:, :, j:j + w] for j in range(3)], axis=-1)
    y = y + jnp.einsum("bhwc,co->bhwo", cols, k[i].reshape(3 * c, o))
  return y


CONV_VARIANTS = dict(lax=conv_lax, im2col_w=conv_im2col_w, im2col_full=conv_im2col_full, taps_dot=conv_taps_dot,
                     rows_dot=conv_rows_dot)


def upsample_repeat(x, k, b, style, temporal):
  """Reference: nearest 2x upsampling by `jnp.repeat`, then the convolution (the formulation before phases)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
  y = layers.conv_apply(x, k, b, padding=style.up_padding())
  return layers.depth_to_time(y, 2)[:, 1:] if temporal else y


def upsample_layer(x, k, b, style, temporal):
  """`layers.Upsample` as it is now."""
  return layers.Upsample(style, temporal).apply({"params": {"conv": {"kernel": k, "bias": b}}}, x)


def model_fns(kind: str, shape, direction: str):
  """Encode or decode of a full-size SD2.1 model (image VAE or CV-VAE), `upsample_impl` "xla" (repeat) and "subpixel"
  (phase)."""
  import cvvae_jax
  model = cvvae_jax.ImageVAE() if kind == "image" else cvvae_jax.CVVAE(variant="sd21")
  params = random_params(model, seed=0)
  if direction == "decode":
    shape = (shape[0], shape[1] // 8, shape[2] // 8, 4) if kind == "image" else (
        shape[0], (shape[1] - 1) // 4 + 1, shape[2] // 8, shape[3] // 8, 4)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
  def call_of(impl):
    m = model.clone(upsample_impl=impl)
    if direction == "encode":
      return lambda p, x: m.apply({"params": p}, x, method="encode").mean
    return lambda p, x: m.apply({"params": p}, x, method="decode")
  return dict(repeat=call_of("xla"), phase=call_of("subpixel")), (params, x)


def vs_torch(dims, repeats: int) -> list[dict]:
  """XLA's 3x3 'same' convolution and torch's conv2d (NCHW, channels-last) on one shape, calls alternated."""
  import torch
  torch.set_num_threads(2)
  bsz, h, w, c, o = dims
  rng = np.random.default_rng(0)
  x = rng.standard_normal((bsz, h, w, c), np.float32)
  k = (rng.standard_normal((3, 3, c, o), np.float32) / np.sqrt(9 * c)).astype(np.float32)
  xj, kj = jnp.asarray(x), jnp.asarray(k)
  xla = jax.jit(conv_lax).lower(xj, kj).compile()
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  kt = torch.from_numpy(np.transpose(k, (3, 2, 0, 1)).copy())
  xcl = xt.contiguous(memory_format=torch.channels_last)
  calls = dict(xla=lambda: xla(xj, kj).block_until_ready(),
               torch_nchw=lambda: torch.nn.functional.conv2d(xt, kt, padding=1),
               torch_channels_last=lambda: torch.nn.functional.conv2d(xcl, kt, padding=1))
  times = {n: [] for n in calls}
  with torch.inference_mode():
    for f in calls.values():
      f()
    for _ in range(repeats):
      for n, f in calls.items():
        t = time.perf_counter()
        f()
        times[n].append(time.perf_counter() - t)
  gflop = 2 * bsz * h * w * 9 * c * o / 1e9
  return [dict(variant=n, best_s=min(v), median_s=statistics.median(v), best_ratio=min(v) / min(times["xla"]),
               median_ratio=statistics.median(v) / statistics.median(times["xla"]), gflops_at_best=gflop / min(v),
               max_abs_diff=float("nan"), max_abs_ref=float("nan")) for n, v in times.items()]


def interleaved(fns: dict, args, repeats: int, ref_name: str) -> list[dict]:
  compiled = {n: jax.jit(f).lower(*args).compile() for n, f in fns.items()}
  temp_mb = {n: c.memory_analysis().temp_size_in_bytes / 2 ** 20 for n, c in compiled.items()}
  outs = {n: jax.block_until_ready(c(*args)) for n, c in compiled.items()}
  ref = jax.tree.leaves(outs[ref_name])
  times = {n: [] for n in fns}
  for _ in range(repeats):
    for n, c in compiled.items():
      t = time.perf_counter()
      jax.block_until_ready(c(*args))
      times[n].append(time.perf_counter() - t)
  rows = []
  for n in fns:
    err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(jax.tree.leaves(outs[n]), ref))
    scale = max(float(jnp.max(jnp.abs(r))) for r in ref)
    rows.append(dict(variant=n, best_s=min(times[n]), median_s=statistics.median(times[n]),
                     best_ratio=min(times[n]) / min(times[ref_name]),
                     median_ratio=statistics.median(times[n]) / statistics.median(times[ref_name]),
                     max_abs_diff=err, max_abs_ref=scale, xla_temp_mb=temp_mb[n]))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--exp", default="conv3x3", choices=["conv3x3", "conv3d", "upsample", "model", "vs_torch"])
  p.add_argument("--model", default="image", choices=["image", "cvvae"])
  p.add_argument("--direction", default="decode", choices=["encode", "decode"])
  p.add_argument("--shape", default="1,256,256,128,128")
  p.add_argument("--variants", default="")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--grad", action="store_true")
  p.add_argument("--video_t", type=int, default=0, help="upsample: frames (0 = image)")
  p.add_argument("--temporal", action="store_true", help="upsample: temporal depth-to-time")
  p.add_argument("--replicate", action="store_true", help="upsample: replicate padding")
  args = p.parse_args()
  dims = [int(v) for v in args.shape.split(",")]
  rng = np.random.default_rng(0)
  if args.exp == "vs_torch":
    for r in vs_torch(dims, args.repeats):
      r.update(exp=args.exp, shape=dims, loadavg=os.getloadavg()[0])
      print(json.dumps(r), flush=True)
    return
  if args.exp == "model":
    fns, fargs = model_fns(args.model, dims, args.direction)
    flops = float("nan")
  elif args.exp == "conv3x3":
    bsz, h, w, c, o = dims
    x = jnp.asarray(rng.standard_normal((bsz, h, w, c), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32) / np.sqrt(9 * c))
    fns = {n: f for n, f in CONV_VARIANTS.items() if not args.variants or n in args.variants.split(",")}
    fargs = (x, k)
    flops = 2 * bsz * h * w * 9 * c * o
  elif args.exp == "conv3d":
    bsz, t, h, w, c, o = dims
    x = jnp.asarray(rng.standard_normal((bsz, t, h, w, c), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 3, c, o), np.float32) / np.sqrt(27 * c))
    static = ((1, 1, 1), (2, 0, layers.Pad.REPLICATE), ((1, 1), (1, 1)), None)
    padding = ((2, 0, layers.Pad.REPLICATE), (1, 1, layers.Pad.ZEROS), (1, 1, layers.Pad.ZEROS))
    fns = dict(taps=lambda x, k: cpu_conv.conv3d_taps(x, k, *static),
               frame_loop=lambda x, k: cpu_conv.conv3d_looped(x, k, *static),
               xla=lambda x, k: conv_ops.conv_apply(x, k, 0.0, padding=padding, impl="xla"))
    fargs = (x, k)
    flops = 2 * bsz * t * h * w * 27 * c * o
  else:
    bsz, h, w, c = dims
    video = args.video_t > 0
    pad = layers.Pad.REPLICATE if args.replicate else layers.Pad.ZEROS
    style = layers.ConvStyle(video=video, space_pad=pad, up_time_pad=pad)
    shape = (bsz, args.video_t, h, w, c) if video else (bsz, h, w, c)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    factor = 2 if args.temporal else 1
    kshape = ((3,) if video else ()) + (3, 3, c, factor * c)
    k = jnp.asarray(rng.standard_normal(kshape, np.float32) / np.sqrt(9 * c))
    bias = jnp.zeros((factor * c,), jnp.float32)
    fns = dict(repeat=lambda x, k: upsample_repeat(x, k, bias, style, args.temporal),
               layer=lambda x, k: upsample_layer(x, k, bias, style, args.temporal))
    fargs = (x, k)
    flops = 2 * int(np.prod(shape)) * 4 * int(np.prod(kshape[:-1])) * factor
  if args.grad:
    def vjp(f):
      def g(x, k):
        y, pull = jax.vjp(f, x, k)
        return pull(jnp.ones_like(y))
      return g
    fns = {n: vjp(f) for n, f in fns.items()}
  rows = interleaved(fns, fargs, args.repeats, next(iter(fns)))
  for r in rows:
    r.update(exp=args.exp, shape=dims, grad=args.grad, ref_gflop=flops / 1e9,
             ref_gflops_at_best=flops / 1e9 / r["best_s"], loadavg=os.getloadavg()[0])
    if args.exp == "model":
      r.update(model=args.model, direction=args.direction)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
