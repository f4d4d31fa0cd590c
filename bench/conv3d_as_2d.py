"""Experiment: the whole CV-VAE with its 3x3x3 convolutions computed as sums of 2D convolutions (proposal for layers.py).

    python bench/conv3d_as_2d.py [--shape 9,64,64] [--repeats 3]

XLA's CPU 3D convolution runs at 0.55-0.85x the rate of its 2D convolution on this machine (see README section 2).
`conv3d_as_2d` computes a rank-3 `lax.conv_general_dilated` (NDHWC, DHWIO) as
`sum_i conv2d(frames i, i + s, ..., kernel[i])`. This script times the SD2.1 CV-VAE (full size, random weights)
encode and decode with `layers.Conv` as it is and with the 3D case routed through `conv3d_as_2d` (patched for the
run only), checks that the outputs agree, and prints one JSON line. Not used by the library.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def conv3d_as_2d(x, kernel, window_strides, padding, dimension_numbers=None, precision=None, **kw):
  """`lax.conv_general_dilated` for NDHWC x DHWIO kernels, as kt 2D convolutions over strided frame slices."""
  import jax.numpy as jnp
  from jax import lax

  (t_lo, t_hi), space_pad = padding[0], list(padding[1:])
  if t_lo or t_hi:
    x = jnp.pad(x, [(0, 0), (t_lo, t_hi), (0, 0), (0, 0), (0, 0)])
  kt, st = kernel.shape[0], window_strides[0]
  b, t = x.shape[:2]
  t_out = (t - kt) // st + 1
  y = None
  for i in range(kt):
    frames = x[:, i:i + st * (t_out - 1) + 1:st]
    yi = lax.conv_general_dilated(frames.reshape(b * t_out, *frames.shape[2:]), kernel[i], window_strides[1:],
                                  space_pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    y = yi if y is None else y + yi
  return y.reshape(b, t_out, *y.shape[1:])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="9,64,64")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  import jax
  import numpy as np
  from jax import lax

  import cvvae_jax
  from cvvae_jax import inference, layers

  t, h, w = (int(v) for v in args.shape.split(","))
  vae = cvvae_jax.CVVAE(variant="sd21")
  params = inference.random_params(vae, seed=0)
  x = np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((1, (t - 1) // 4 + 1, h // 8, w // 8, 4)).astype(np.float32)
  original_conv = lax.conv_general_dilated

  def routed(lhs, rhs, window_strides, padding, *a, dimension_numbers=None, **kw):
    if dimension_numbers == ("NDHWC", "DHWIO", "NDHWC") and rhs.shape[0] > 1:
      return conv3d_as_2d(lhs, rhs, window_strides, padding, precision=kw.get("precision"))
    return original_conv(lhs, rhs, window_strides, padding, *a, dimension_numbers=dimension_numbers, **kw)

  def timed(method, inp):
    fn = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=method))
    compiled = fn.lower(params, inp).compile()
    out = compiled(params, inp)
    out = out.mean if hasattr(out, "mean") else out
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, inp))
      times.append(time.perf_counter() - start)
    return np.asarray(out), statistics.median(times)

  result = dict(shape=[1, t, h, w, 3])
  for method, inp in (("encode", x), ("decode", z)):
    ref, t3d = timed(method, inp)
    layers.lax.conv_general_dilated = routed  # layers.py calls lax.conv_general_dilated through its module
    try:
      new, t2d = timed(method, inp)
    finally:
      layers.lax.conv_general_dilated = original_conv
    result[method] = dict(conv3d_s=t3d, as_2d_s=t2d, speedup=t3d / t2d,
                          max_abs_diff=float(np.abs(new - ref).max()), scale=float(np.abs(ref).max()))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
