r"""Training the SD-architecture image VAE: `python train.py --config configs/image_vae.py[:ARG] --workdir DIR`.

ARG: `sd21` (default; 4 latent channels with quant convs) or `sd3` (16 channels, none), and `full` (default)
or `demo` (a tiny image VAE on single frames of the embedded training clips, a few minutes on a laptop CPU). With
no pretrained SD VAE weights reachable, the demo trains this first, then `configs/cvvae.py:demo` inflates it
into CV-VAE and uses it, frozen, as the latent regularizer.
"""
import ml_collections

from cvvae_jax.data import config as data_config
from cvvae_jax.train import config as common

CHOICES = {"variant": ("sd21", "sd3"), "scale": ("full", "demo")}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, CHOICES, {"variant": "sd21", "scale": "full"})
  variant, scale = args["variant"], args["scale"]
  sd3 = variant == "sd3"
  c = ml_collections.ConfigDict()
  c.arg = arg
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      kind="image_vae",
      block_out_channels=(128, 256, 512, 512) if scale == "full" else (32, 32, 64, 64),
      layers_per_block=2 if scale == "full" else 1,
      latent_channels=16 if sd3 else 4, use_quant_conv=not sd3, use_post_quant_conv=not sd3,
      scaling_factor=1.5305 if sd3 else 0.18215, shift_factor=0.0609 if sd3 else 0.0))
  c.image_vae = ml_collections.ConfigDict(dict(path=""))  # unused: no regularizer for the image VAE itself
  c.init_from = ml_collections.ConfigDict(dict(kind="scratch", path=""))
  c.loss = ml_collections.ConfigDict(dict(
      # The demo trains on L1 alone (README, quick start): no GAN phase (in the last 40 of 160 steps it cost
      # 0.2-0.3 dB on the held-out frames) and no LPIPS (without it a step costs under half, and 160 steps score
      # 17.7 dB held-out against 17.3 with it; the time buys 3x the steps).
      kl_weight=1e-6, perceptual_weight=0.5 if scale == "full" else 0.0, disc_weight=0.5,
      disc_start=50_001 if scale == "full" else 1_000_000,
      reg_decoder_weight=0.0, reg_encoder_weight=0.0, logvar_init=0.0, psi="random",
      adaptive_weight_eps=1e-4, adaptive_weight_max=1e4, perceptual_frames=0))  # frames: for clips only
  c.discriminator = ml_collections.ConfigDict(dict(ndf=64 if scale == "full" else 32,
                                                   n_layers=3 if scale == "full" else 2))
  c.train = common.train_section(scale)
  if scale == "demo":
    c.train.num_steps = 480  # held-out probe: 17.7 dB after 160 steps; in a 480-step run 18.2 at 160, 20.6 at 480
    c.train.eval_every_steps = 80  # the probe scores 81 frames: every 20 steps it cost ~15 % of the stage
  c.optim = common.optim_section(scale, c.train.num_steps)
  if scale == "demo":
    c.optim.generator.peak_lr = 1e-3  # held-out probe at step 160: +0.4 dB over 4e-4 (README, quick start)
  c.data = data_config.get_config(scale)
  c.data.seed = c.get_ref("seed")
  # Images only: the full recipe's image stream; the demo's single frames of the training clips.
  image = c.data.streams.image if scale == "full" else data_config.demo_frames_stream()
  c.data.streams = ml_collections.ConfigDict({"image" if scale == "full" else "frames": image})
  c.data.mixing = "alternate"
  c.mesh = common.mesh_section()
  return c
