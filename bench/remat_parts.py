r"""What each part of the generator step holds for its backward pass, under each remat policy (compile only).

    python bench/remat_parts.py [--parts lpips,image_decoder,decoder,encoder,units] [--policies none,blocks,full]
        [--out bench/results/remat_parts.json]

Each part is compiled alone at the paper's size (one 17x256x256 clip, bf16 compute, `conv_impl="xla"` as the proxy
of the accelerator program) as `jax.grad` of the sum of its output, and XLA's `memory_analysis` gives its
temporaries: LPIPS-VGG on 17 frame pairs (w.r.t. the reconstruction, through `remat.checkpointed_map` as the
trainer calls it), the frozen SD image decoder on the 5 latent frames, the CV-VAE decoder and encoder (w.r.t. their
params), and single full-resolution units (res blocks, the last upsampler, one conv, one GroupNorm; w.r.t. params
and input, as inside the decoder's backward pass). Runs with
XLA:CPU's memory-minimizing scheduler, as `train_cost.py`. Results and reading: bench/README_train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cvvae_jax.models import layers, lpips, remat as remat_lib  # noqa: E402
from cvvae_jax.models.sd_vae import ImageVAE  # noqa: E402
from cvvae_jax.models.vae3d import CVVAE, variant_style  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32
CLIP, LATENT = (1, 17, 256, 256, 3), (1, 5, 32, 32, 4)


def temp_gib(fn, *args, argnums=0) -> dict:
  """Temporaries of `grad(sum(fn(*args)))` w.r.t. `args[argnums]`."""
  t = time.perf_counter()
  compiled = jax.jit(jax.grad(lambda *a: fn(*a).astype(F32).sum(), argnums=argnums)).lower(*args).compile()
  return dict(temp_gib=round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
              compile_s=round(time.perf_counter() - t, 1))


def shapes(module, example):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), example)["params"]


def part(name: str, policy: str) -> dict:
  """Temporaries of `jax.grad` through one part under `policy`."""
  if name == "lpips":
    frames = jax.ShapeDtypeStruct((CLIP[1], *CLIP[2:]), F32)
    def loss(y, x, params):
      dist = lambda a, b: lpips.lpips_distance(params, a, b, dtype=BF16)
      return remat_lib.checkpointed_map(dist, policy, x, y)
    return temp_gib(loss, frames, frames, lpips.lpips_param_shapes())
  if name == "image_decoder":
    vae = ImageVAE(dtype=BF16, remat=policy, conv_impl="xla")
    def decoded(z, params):
      decode = lambda latents: vae.apply({"params": params}, latents, method="decode")
      return remat_lib.checkpointed_map(decode, policy, z)
    return temp_gib(decoded, jax.ShapeDtypeStruct((LATENT[1], *LATENT[2:]), F32), shapes(vae, jnp.zeros((1, 8, 8, 3))))
  vae = CVVAE(dtype=BF16, remat=policy, conv_impl="xla")
  params = shapes(vae, jnp.zeros((1, 1, 8, 8, 3)))
  if name == "decoder":
    return temp_gib(lambda p, z: vae.apply({"params": p}, z, method="decode"), params,
                    jax.ShapeDtypeStruct(LATENT, F32))
  if name == "encoder":
    return temp_gib(lambda p, x: vae.apply({"params": p}, x, method="encode").mean, params,
                    jax.ShapeDtypeStruct(CLIP, F32))
  raise ValueError(f"unknown part {name!r}")


def units() -> list[dict]:
  """Single full-resolution units of the decoder (no remat: what one unit's backward needs at once)."""
  style, (t, h, w) = variant_style("sd21").decoder, CLIP[1:4]
  cases = [("res block 128 -> 128", layers.ResBlock(128, style, dtype=BF16, epsilon=1e-5, conv_impl="xla"),
            (1, t, h, w, 128)),
           ("res block 256 -> 128", layers.ResBlock(128, style, dtype=BF16, epsilon=1e-5, conv_impl="xla"),
            (1, t, h, w, 256)),
           ("upsampler 256 ch to 256x256", layers.Upsample(style, False, dtype=BF16, conv_impl="xla"),
            (1, t, h // 2, w // 2, 256)),
           ("3x3x3 conv 128 ch", layers.Conv(128, (3, 3, 3), padding=style.main_padding(), dtype=BF16,
                                             conv_impl="xla"), (1, t, h, w, 128)),
           ("GroupNorm 128 ch", layers.GroupNorm(32, 1e-5), (1, t, h, w, 128))]
  rows = []
  for name, module, shape in cases:
    x = jax.ShapeDtypeStruct(shape, BF16)
    params = shapes(module, jnp.zeros(shape, BF16))
    row = temp_gib(lambda p, x, m=module: m.apply({"params": p}, x), params, x, argnums=(0, 1))
    rows.append(dict(unit=name, input_gib=round(x.size * 2 / 2**30, 3), **row))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="lpips,image_decoder,decoder,encoder,units")
  parser.add_argument("--policies", default="none,blocks,full")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "remat_parts.json"))
  args = parser.parse_args(argv)
  report = {"jax": jax.__version__, "load": " ".join(f"{x:.1f}" for x in os.getloadavg()), "parts": [], "units": []}
  for name in filter(None, args.parts.split(",")):
    if name == "units":
      report["units"] = units()
      continue
    for policy in filter(None, args.policies.split(",")):
      report["parts"].append(dict(part=name, policy=policy, **part(name, policy)))
      print(json.dumps(report["parts"][-1]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
