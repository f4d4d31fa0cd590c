r"""Training CV-VAE: `python train.py --config configs/cvvae.py[:ARG] --workdir DIR`.

ARG is comma-separated words: the variant, `sd21` (default; 4 latent channels, SD2.1 image VAE as the
regularizer) or `sd3` (16 channels), and the scale, `full` (default: the paper's run, for pods) or `demo`
(tiny models on the embedded real data, minutes on a laptop CPU). E.g. `configs/cvvae.py:sd3,demo`.

Full runs start from a pretrained SD image VAE: set `image_vae.path` to its original PyTorch folder
(diffusers `AutoencoderKL`: config.json + diffusion_pytorch_model.safetensors) or our export; CV-VAE is
inflated from it (`init_from.kind="inflate"`) and the same frozen image VAE is the latent regularizer.
The demo expects the small image VAE trained by `configs/image_vae.py:demo` (see README / demo.sh).
Any field can be overridden on the command line, e.g. `--config.loss.psi=slice`.
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

  # The trained model: fields of cvvae_jax.CVVAE.
  c.model = ml_collections.ConfigDict(dict(
      kind="cvvae", variant=variant,
      block_out_channels=(128, 256, 512, 512) if scale == "full" else (32, 32, 64, 64),
      layers_per_block=2 if scale == "full" else 1,
      latent_channels=16 if sd3 else 4, half_3d=True,
      scaling_factor=1.5305 if sd3 else 0.18215, shift_factor=0.0609 if sd3 else 0.0))

  # The frozen SD image VAE (regularizer and inflation source): an original folder, our export or a workdir.
  c.image_vae = ml_collections.ConfigDict(dict(path=""))
  # Where the CV-VAE params start: "inflate" (from image_vae), "pretrained" (a CV-VAE at init_from.path) or
  # "scratch". A checkpoint in the workdir always wins (resume).
  c.init_from = ml_collections.ConfigDict(dict(kind="inflate", path=""))

  c.loss = ml_collections.ConfigDict(dict(
      kl_weight=1.0 if scale == "full" else 1e-6, perceptual_weight=0.5, disc_weight=0.5,
      # The demo: no GAN phase (disc_start past its last step; README, quick start).
      disc_start=1 if scale == "full" else 1_000_000, reg_decoder_weight=1.0, reg_encoder_weight=0.0,
      logvar_init=0.0, psi="random", adaptive_weight_eps=1e-4, adaptive_weight_max=1e4,
      # LPIPS on this many random frames of each clip per step (an unbiased estimate at k/T of the cost; the
      # original: 0, every frame).
      perceptual_frames=0))
  c.discriminator = ml_collections.ConfigDict(dict(ndf=64 if scale == "full" else 32,
                                                   n_layers=4 if scale == "full" else 2))

  c.train = common.train_section(scale)
  if scale == "demo":
    c.train.num_steps = 120
    c.train.eval_every_steps = 40
  c.optim = common.optim_section(scale, c.train.num_steps)  # the cosine schedule ends at the last step
  if scale == "demo":
    # The inflated start already scores 19.3 dB held-out: at 4e-4 the warm-up took it to 17.5 by step 40 and
    # back to 19.9 only at step 160; at 1e-4 it rises at every probe, 19.95 at step 120 (README, quick start).
    c.optim.generator.peak_lr = 1e-4
  c.data = data_config.get_config(scale)
  c.data.seed = c.get_ref("seed")
  if scale == "demo":
    c.data.streams.video.batch_size = 1  # 9x64x64 clips: the costly stream on a 2-core CPU
    del c.data.streams["image"]  # images: single frames of the training clips, not the embedded photos
    c.data.streams.frames = data_config.demo_frames_stream()
    # L1 alone, as the demo's image VAE (configs/image_vae.py). With LPIPS, `perceptual_frames=3` (3 of the 9
    # frames) halves the clip step's cost: 4.9 s -> 2.5 s (bench/README_train.md).
    c.loss.perceptual_weight = 0.0
  c.mesh = common.mesh_section()
  return c
