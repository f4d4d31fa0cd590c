"""A run's networks from its config: the trained VAE, the discriminator, the frozen image VAE and LPIPS, the
optimizers, the VAE's initial params (`config.init_from`), and the start-up checks of the config."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from cvvae_jax.models import lpips, registry, remat as remat_lib
from cvvae_jax.models.discriminator import PatchDiscriminator3D
from cvvae_jax.models.partitioning import ActivationSharding
from cvvae_jax.models.sd_vae import ImageVAE
from cvvae_jax.models.vae3d import CVVAE
from cvvae_jax.train import losses, optim
from cvvae_jax.weights import inflate, pretrained


@dataclasses.dataclass(frozen=True)
class Models:
  """The (static) network definitions of a run."""

  vae: CVVAE | ImageVAE
  disc: PatchDiscriminator3D
  image_vae: ImageVAE | None      # the frozen regularizer (None when no regularization is configured)
  weights: losses.LossWeights
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  lr_schedule: optax.Schedule        # of the training step, for logging
  disc_lr_schedule: optax.Schedule
  alternate: bool
  grad_accum_steps: int
  ema_decay: float
  image_micro_batch: int = 0  # images per device per micro-batch of 1-frame batches (0: all; `step.micro_batches`)
  accum_loop: str = "scan"  # how micro-batches are looped: "scan" | "unrolled" (`resolve_accum_loop`)
  remat_frames: int = 1  # frames per recomputed call of the loss networks (`remat.checkpointed_map`)
  generator_only_steps: int = 0  # first steps that update only the generator (`train.generator_only_before_gan`)

  @property
  def is_video(self) -> bool:
    return isinstance(self.vae, CVVAE)


ACCUM_LOOPS = ("auto", "scan", "unrolled")


def resolve_accum_loop(loop: str, platform: str | None = None) -> str:
  """`train.accum_loop`, `auto` resolved: "unrolled" on "cpu", "scan" elsewhere. A `lax.scan` over the micro-batches
  keeps one micro-batch's activations live on any compiler; XLA:CPU runs the convolutions of a loop body ~10x slower
  than the same ones in straight-line code (bench/README_train.md), so the CPU gets the loop unrolled."""
  if loop not in ACCUM_LOOPS:
    raise ValueError(f"config.train.accum_loop: expected one of {ACCUM_LOOPS}, got {loop!r}")
  if loop != "auto":
    return loop
  return "unrolled" if (platform or jax.default_backend()) == "cpu" else "scan"


def build_vae(model_cfg: ml_collections.ConfigDict, dtype=jnp.float32, remat: bool | str = "none",
              conv_impl: str = "auto", upsample_impl: str = "auto",
              activation_sharding: ActivationSharding | None = None) -> CVVAE | ImageVAE:
  """`config.model` -> CVVAE or ImageVAE (`models.registry.build_model`) computing in `dtype`, its convolutions by
  `conv_impl` and `upsample_impl`, recomputing activations in the backward pass as the `remat` policy says
  (`models/remat.py`), its activations split on the mesh as `activation_sharding` says (`models/partitioning.py`;
  the trainer's from `sharding.activation_sharding(mesh)`)."""
  return registry.build_model(model_cfg, dtype=dtype, remat=remat, conv_impl=conv_impl, upsample_impl=upsample_impl,
                              activation_sharding=activation_sharding)


def build_models(config: ml_collections.ConfigDict, image_vae: ImageVAE | None,
                 activation_sharding: ActivationSharding | None = None) -> Models:
  """The run's networks; `activation_sharding` (the mesh's spatial split, `sharding.activation_sharding`) goes to
  the trained VAE and the frozen image VAE."""
  dtype = registry.parse_dtype(config.train.compute_dtype, "config.train.compute_dtype")
  impls = dict(conv_impl=config.train.conv_impl, upsample_impl=config.train.upsample_impl,
               activation_sharding=activation_sharding)
  try:
    remat = remat_lib.policy_name(config.train.remat)
  except ValueError as e:
    raise ValueError(f"config.train.remat: {e}") from None
  vae = build_vae(config.model, dtype, remat, **impls)
  weights = losses.LossWeights(**config.loss)
  if isinstance(vae, CVVAE) and (weights.reg_decoder_weight or weights.reg_encoder_weight) and image_vae is None:
    raise ValueError("config.loss.reg_decoder_weight/reg_encoder_weight need a frozen image VAE: set "
                     "config.image_vae.path")
  if image_vae is not None and isinstance(vae, CVVAE) and image_vae.latent_channels != vae.latent_channels:
    raise ValueError(f"config.image_vae.path: the image VAE has {image_vae.latent_channels} latent channels, "
                     f"the CV-VAE {vae.latent_channels}; its decoder cannot decode the video latents")
  accum = int(config.train.grad_accum_steps)
  # Before the GAN starts the discriminator's loss is 0: with generator_only_before_gan those steps update G.
  g_only = int(config.loss.disc_start) if config.train.get("generator_only_before_gan", False) else 0
  if accum < 1:
    raise ValueError(f"config.train.grad_accum_steps: expected >= 1, got {accum}")
  image_micro = int(config.train.get("image_micro_batch", 0))
  if image_micro < 0:
    raise ValueError(f"config.train.image_micro_batch: expected >= 0 (0: the whole batch), got {image_micro}")
  return Models(
      vae=vae, disc=PatchDiscriminator3D(**config.discriminator, dtype=dtype, conv_impl=config.train.conv_impl,
                                         remat=remat),
      # The frozen image VAE: the same units recomputed, no parameter gradients (`remat.frozen`).
      image_vae=(image_vae.clone(dtype=dtype, remat=remat_lib.frozen(remat), **impls)
                 if image_vae is not None and isinstance(vae, CVVAE) else None),
      weights=weights, tx=optim.make_generator_optimizer(config.optim, g_only),
      disc_tx=optim.make_discriminator_optimizer(config.optim, g_only),
      lr_schedule=optim.generator_lr_schedule(config.optim),
      disc_lr_schedule=optim.discriminator_lr_schedule(config.optim), alternate=bool(config.train.alternate_updates),
      grad_accum_steps=accum, image_micro_batch=image_micro, ema_decay=float(config.train.ema_decay),
      accum_loop=resolve_accum_loop(config.train.get("accum_loop", "auto")),
      remat_frames=int(config.train.get("remat_frames", 1)),
      generator_only_steps=g_only)


def load_frozen(config: ml_collections.ConfigDict, model_kind: str):
  """(image VAE module or None, {"image_vae": params, "lpips": params}) from `config.image_vae`/`config.loss`."""
  frozen, image_vae = {}, None
  if config.loss.perceptual_weight:
    frozen["lpips"] = lpips.load_lpips_params()
  if model_kind == "cvvae" and config.image_vae.path:
    image_vae, frozen["image_vae"] = pretrained.load_pretrained(config.image_vae.path)
    if not isinstance(image_vae, ImageVAE):
      raise ValueError(f"config.image_vae.path={config.image_vae.path!r} holds a {type(image_vae).__name__}, "
                       "expected an SD image VAE (diffusers AutoencoderKL or our ImageVAE)")
  return image_vae, frozen


def initial_vae_params(config: ml_collections.ConfigDict, models: Models, frozen: dict):
  """Host params for the VAE per `config.init_from` (None: random init)."""
  kind, path = config.init_from.kind, config.init_from.path
  if kind == "scratch":
    return None
  if kind == "inflate":
    if not models.is_video:
      raise ValueError("config.init_from.kind='inflate' makes a CV-VAE from an image VAE; the model is an image VAE")
    source = path or config.image_vae.path
    if not source:
      raise ValueError("config.init_from.kind='inflate' needs config.init_from.path or config.image_vae.path")
    image_vae, image_params = (models.image_vae, frozen["image_vae"]) if source == config.image_vae.path and \
        "image_vae" in frozen else pretrained.load_pretrained(source)
    logging.info("init: inflating the image VAE at %s into %s", source, type(models.vae).__name__)
    return inflate.inflate_params(image_params, image_vae.clone(dtype=jnp.float32),
                                  models.vae.clone(dtype=jnp.float32, remat="none"))
  if kind == "pretrained":
    if not path:
      raise ValueError("config.init_from.kind='pretrained' needs config.init_from.path")
    model, params = pretrained.load_pretrained(path)
    if registry.architecture(model) != registry.architecture(models.vae):  # tiling settings may differ
      raise ValueError(f"config.init_from.path={path!r} holds {registry.architecture(model)}, but config.model "
                       f"describes {registry.architecture(models.vae)}")
    return params
  raise ValueError(f"config.init_from.kind: expected 'inflate', 'pretrained' or 'scratch', got {kind!r}")



def validate_config(config: ml_collections.ConfigDict) -> None:
  """Start-up checks that name the config field at fault."""
  tc = 4
  for name, stream in config.data.streams.items():
    if stream.frames < 1 or (stream.frames - 1) % tc:
      raise ValueError(f"config.data.streams.{name}.frames={stream.frames}: expected 1 + {tc}k frames "
                       "(1, 5, 9, 17, ...)")
    sc = 2 ** (len(config.model.block_out_channels) - 1)
    if any(int(s) % sc for s in stream.size):
      raise ValueError(f"config.data.streams.{name}.size={tuple(stream.size)}: expected multiples of {sc}")
    if config.model.kind == "image_vae" and stream.frames != 1:
      raise ValueError(f"config.data.streams.{name}.frames={stream.frames}: the image VAE trains on images "
                       "(frames=1)")
  if config.train.alternate_updates and config.optim.steps_per_update != 2:
    raise ValueError("config.optim.steps_per_update must be 2 when config.train.alternate_updates is True "
                     f"(each optimizer updates every other step), got {config.optim.steps_per_update}")
  if not config.train.alternate_updates and config.optim.steps_per_update != 1:
    raise ValueError("config.optim.steps_per_update must be 1 when config.train.alternate_updates is False, "
                     f"got {config.optim.steps_per_update}")
