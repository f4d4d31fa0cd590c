"""Inference: encode videos to latents and decode them back at any size (`api`), chunked and tiled (`plan`,
`tiling`), and the reconstruct command line.

    from cvvae_jax import inference
    z = inference.encode(vae, params, video)       # video [B, 1+4k, H, W, 3] in [-1, 1] -> scaled latents
    video = inference.decode(vae, params, z)
"""
from cvvae_jax.inference.api import (Coder, decode, decode_streaming, encode, encode_posterior, encode_streaming,
                                     params_for, plan_for, posterior_streaming, with_dtype)
from cvvae_jax.inference.plan import Mode, TilingConfig

__all__ = ["TilingConfig", "Mode", "encode", "decode", "encode_posterior", "encode_streaming", "decode_streaming",
           "posterior_streaming", "with_dtype", "Coder", "plan_for", "params_for"]
