"""The pieces every training config shares (`configs/*.py`): argument parsing and the trainer's own sections."""
import ml_collections

from cvvae_jax.train import optim


def parse_arg(arg: str, choices: dict[str, tuple[str, ...]], defaults: dict[str, str]) -> dict[str, str]:
  """'sd3,demo' -> {'variant': 'sd3', 'scale': 'demo'}; unknown words are an error naming the choices."""
  out = dict(defaults)
  for word in filter(None, (w.strip() for w in (arg or "").split(","))):
    for field, values in choices.items():
      if word in values:
        out[field] = word
        break
    else:
      allowed = ", ".join(f"{f}: {'|'.join(v)}" for f, v in choices.items())
      raise ValueError(f"unknown config argument {word!r}; expected comma-separated words from ({allowed})")
  return out


def train_section(scale: str) -> ml_collections.ConfigDict:
  """Loop settings: steps, logging, checkpoints, guards, gradient accumulation, EMA."""
  full = scale == "full"
  return ml_collections.ConfigDict(dict(
      num_steps=200_000 if full else 240,
      log_every_steps=50 if full else 10,
      image_every_steps=2_000 if full else 40,      # PNG grid: input / reconstruction / image decoder
      # Probe: val/rec_l1, val/psnr, val/reg_l1, val/reg_psnr of fixed clips (the first `eval_batches` batches of
      # `data.eval`, posterior mode) at step 0, every N steps and at the end; 0 disables it. Off in `full` until
      # `data.eval.path` names a held-out set.
      eval_every_steps=0 if full else 20,
      eval_batches=4,
      checkpoint_every_steps=2_000 if full else 80,
      keep_checkpoints=3,
      async_checkpoints=True,
      verify_checkpoints=True,                       # check each step's crc32c checksums before restoring it
      grad_accum_steps=1,                            # micro-batches per step (the batch dim is split)
      # 1-frame (image) batches: images per device per micro-batch (0: all at once). 1 in `full`: the image
      # stream's 8 images of 320x320 per device one at a time, 31.4 -> 6.5 GiB (bench/README_train.md).
      image_micro_batch=1 if full else 0,
      accum_loop="auto",                             # micro-batches in a "scan" | "unrolled" ("auto": unrolled
                                                     # on CPU, whose loop bodies run slow; scan elsewhere)
      ema_decay=0.0,                                 # 0 disables the EMA of generator params
      max_nan_steps=10,                              # consecutive non-finite steps before stopping
      alternate_updates=True,                        # G and D on alternate steps (released); False: both
      # Steps before loss.disc_start update only the generator (their discriminator loss is 0; the released code
      # alternates from step 0, spending half of them on a discriminator update that changes nothing).
      generator_only_before_gan=not full,
      remat="none",                                  # "none" | "blocks" | "full" | "full_save_convs" |
                                                     # "full_halves" (models/remat.py)
      remat_frames=1,                                # full policies: frames of LPIPS / the image decoder per
                                                     # recomputed call (1: least memory; 0: all at once)
      compute_dtype="float32",                       # "float32" | "bfloat16" (params stay float32)
      # How convolutions are computed (every model of the run): "auto" (xla on TPU/GPU, the CPU forms on CPU) |
      # "xla" | "cpu" | "cpu_taps" | "cpu_frames"; upsampling convolutions: "auto" (subpixel on CPU, else xla) |
      # "xla" | "subpixel". Same params and results (models/conv_impl.py).
      conv_impl="auto",
      upsample_impl="auto",
  ))


def optim_section(scale: str, num_steps: int) -> ml_collections.ConfigDict:
  cfg = optim.make_optimizer_config()
  cfg.generator.total_steps = num_steps
  if scale == "demo":  # a short run on a tiny model: higher rates, short warm-up
    cfg.generator.peak_lr = 4e-4
    cfg.generator.warmup_steps = 20
    cfg.discriminator.lr = 2e-4
  return cfg


def mesh_section() -> ml_collections.ConfigDict:
  """Device mesh (`train/sharding.py`): `data` x `fsdp` split the batch (fsdp also the params), `spatial` splits
  each clip's height (1: no split; the clip height must be a multiple of spatial * the model's downsampling)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, spatial=1))
