"""Latents for diffusion training: encode a video dataset once (`encode`, the `cvvae-encode-latents` command), then
read scaled latents back in deterministic, resumable, per-host batches (`dataset`).

    cvvae-encode-latents --model PATH --data FOLDER --out DIR --frames 17 --resolution 256
    ds = cvvae_jax.latents.dataset(DIR, batch_size=64, rng=0)   # batch["latents"] [B / P, 1+k, h, w, C], scaled
    video = inference.decode(vae, params, batch["latents"])     # back to frames

`records` holds the format (ArrayRecord shards + latents.json). The loader (`dataset`, `records`) imports neither
the models' code nor TensorFlow (`cvvae_jax` itself loads the models); `encode` needs both.
"""
from cvvae_jax.latents.dataset import LatentDataset, LatentIterator, dataset, unscale
from cvvae_jax.latents.records import read_info

__all__ = ["LatentDataset", "LatentIterator", "dataset", "read_info", "unscale"]
