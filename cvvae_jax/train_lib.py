"""CV-VAE training: the train state, a pure sharded `train_step`, and the loop `train_and_evaluate`.

Data flows one way: config -> data -> model -> loss -> optimizer -> step -> checkpoint/metrics.

    state = TrainState(step, params={"vae", "logvar", "logvar_2d"}, disc_params, opt_state, disc_opt_state,
                       ema_params, nan_skips, nan_streak)
    step_fn = TrainStep(models, mesh, state_shardings, frozen_shardings)
    state, metrics, update = step_fn(state, batch, rng, frozen, step)  # jitted per Update and input shape

The generator (the VAE being trained, with the two learned log-variances) and the discriminator are updated on
alternate steps (as the original) or both every step (`train.alternate_updates=False`). The frozen networks
(the SD image VAE of the latent regularizer, LPIPS) are inputs of the step, never trained and never
checkpointed. The loop trains either CV-VAE (`config.model.kind = "cvvae"`) or the SD image VAE itself
(`"image_vae"`, on 1-frame batches, without the regularizer).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cvvae_jax import layers, losses, lpips, optim, regularizer
from cvvae_jax.discriminator import PatchDiscriminator3D
from cvvae_jax.sd_vae import ImageVAE, image_style
from cvvae_jax.vae3d import CVVAE, variant_style

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs (with the data position, which is the step).

  params: {"vae": the trained VAE's params, "logvar": (), "logvar_2d": ()} (the generator side).
  ema_params: an EMA of params["vae"] (empty dict when `train.ema_decay` is 0).
  nan_skips / nan_streak: updates skipped for non-finite loss or gradients, in total / in a row.
  """

  step: Array
  params: Any
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  ema_params: Any
  nan_skips: Array
  nan_streak: Array


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

  @property
  def is_video(self) -> bool:
    return isinstance(self.vae, CVVAE)


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.train.compute_dtype: expected one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def build_vae(model_cfg: ml_collections.ConfigDict, dtype=jnp.float32, remat: bool = False):
  """`config.model` -> CVVAE or ImageVAE (its `kind` picks the class, the rest are the module's fields)."""
  fields = dict(model_cfg)
  kind = fields.pop("kind")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if kind == "cvvae":
    return CVVAE(**fields, dtype=dtype, remat=remat)
  if kind == "image_vae":
    return ImageVAE(**fields, dtype=dtype, remat=remat)
  raise ValueError(f"config.model.kind: expected 'cvvae' or 'image_vae', got {kind!r}")


def build_models(config: ml_collections.ConfigDict, image_vae: ImageVAE | None) -> Models:
  dtype = parse_dtype(config.train.compute_dtype)
  vae = build_vae(config.model, dtype, config.train.remat)
  weights = losses.LossWeights(**config.loss)
  if isinstance(vae, CVVAE) and (weights.reg_decoder_weight or weights.reg_encoder_weight) and image_vae is None:
    raise ValueError("config.loss.reg_decoder_weight/reg_encoder_weight need a frozen image VAE: set "
                     "config.image_vae.path")
  if image_vae is not None and isinstance(vae, CVVAE) and image_vae.latent_channels != vae.latent_channels:
    raise ValueError(f"config.image_vae.path: the image VAE has {image_vae.latent_channels} latent channels, "
                     f"the CV-VAE {vae.latent_channels}; its decoder cannot decode the video latents")
  accum = int(config.train.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"config.train.grad_accum_steps: expected >= 1, got {accum}")
  return Models(
      vae=vae, disc=PatchDiscriminator3D(**config.discriminator, dtype=dtype),
      image_vae=image_vae.clone(dtype=dtype) if image_vae is not None and isinstance(vae, CVVAE) else None,
      weights=weights, tx=optim.make_generator_optimizer(config.optim),
      disc_tx=optim.make_discriminator_optimizer(config.optim),
      lr_schedule=optim.generator_lr_schedule(config.optim),
      disc_lr_schedule=optim.discriminator_lr_schedule(config.optim), alternate=bool(config.train.alternate_updates),
      grad_accum_steps=accum, ema_decay=float(config.train.ema_decay))


# ------------------------------------------------------------------------------------------------------------
# Initialisation


def init_state(models: Models, rng: Array, vae_params: Any | None = None) -> TrainState:
  """A fresh TrainState (pure; jit it with `out_shardings`). `vae_params` replaces the random VAE init."""
  k_vae, k_disc = jax.random.split(rng)
  sc = models.vae.spatial_compression
  x = jnp.zeros((1, 1, sc, sc, 3) if models.is_video else (1, sc, sc, 3))
  if vae_params is None:
    vae_params = models.vae.init(k_vae, x)["params"]
  disc_size = 2 ** (models.disc.n_layers + 2)
  disc_params = models.disc.init(k_disc, jnp.zeros((1, 1, disc_size, disc_size, 3)))["params"]
  logvar_init = jnp.asarray(models.weights.logvar_init, jnp.float32)
  params = {"vae": vae_params, "logvar": logvar_init, "logvar_2d": logvar_init}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params, opt_state=models.tx.init(params),
      disc_opt_state=models.disc_tx.init(disc_params),
      ema_params=jax.tree_util.tree_map(jnp.copy, vae_params) if models.ema_decay > 0 else {},
      nan_skips=jnp.zeros((), jnp.int32), nan_streak=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------------------
# Losses of one batch


def _decoder_style(vae) -> layers.ConvStyle:
  return variant_style(vae.variant).decoder if isinstance(vae, CVVAE) else image_style(vae.padding)


def _model_input(models: Models, video: Array) -> Array:
  """Batch video `[B, T, H, W, 3]` -> the trained model's input (images `[B, H, W, 3]` for the image VAE)."""
  if models.is_video:
    return video
  if video.shape[1] != 1:
    raise ValueError(f"the image VAE trains on 1-frame batches, got video of shape {video.shape}")
  return video[:, 0]


def reconstruct(models: Models, vae_params, x: Array, rng: Array | None):
  """(x_hat, posterior, z, conv_out_input): one VAE pass, sampling z when `rng` is given."""
  post = models.vae.apply({"params": vae_params}, x, method="encode")
  z = post.sample(rng) if rng is not None else post.mode()
  x_hat, inter = models.vae.apply({"params": vae_params}, z, method="decode", mutable=["intermediates"])
  return x_hat, post, z, inter["intermediates"]["decoder"]["conv_out_input"][0]


def generator_loss(params, disc_params, frozen, x: Array, rng: Array, step: Array, models: Models):
  """The generator objective of one batch -> (total, metrics). `x` is the model input in [-1, 1]."""
  w = models.weights
  rng_post, rng_psi = jax.random.split(rng)
  x_hat, post, z, h = reconstruct(models, params["vae"], x, rng_post)

  perceptual = None
  if w.perceptual_weight:
    perceptual = lambda a, b: lpips.lpips_distance(frozen["lpips"], a, b, dtype=models.vae.dtype)
  nll_of = lambda xh: losses.reconstruction_nll(x, xh, params["logvar"], perceptual, w.perceptual_weight)
  gan_of = lambda xh: losses.generator_adversarial_loss(models.disc.apply({"params": disc_params}, xh))
  nll, rec_metrics = nll_of(x_hat)
  g_loss = gan_of(x_hat)

  def adaptive_weight():
    """||grad nll|| / (||grad g|| + eps) at the decoder's last conv kernel (by the chain rule through it)."""
    kernel = params["vae"]["decoder"]["conv_out"]["kernel"]
    bias = params["vae"]["decoder"]["conv_out"]["bias"]
    conv = lambda k: layers.conv_apply(jax.lax.stop_gradient(h), k, bias, padding=_decoder_style(models.vae)
                                       .main_padding(), dtype=models.vae.dtype)
    _, conv_vjp = jax.vjp(conv, jax.lax.stop_gradient(kernel))
    xh = jax.lax.stop_gradient(x_hat)
    grad_nll = conv_vjp(jax.grad(lambda v: nll_of(v)[0])(xh).astype(models.vae.dtype))[0]
    grad_g = conv_vjp(jax.grad(gan_of)(xh).astype(models.vae.dtype))[0]
    return losses.adaptive_generator_weight(grad_nll, grad_g, w.disc_weight, eps=w.adaptive_weight_eps,
                                            max_weight=w.adaptive_weight_max)

  # Before disc_start the GAN term has weight 0: skip the extra backward passes (same compiled step).
  d_weight = jax.lax.cond(losses.disc_factor(step, w.disc_start) > 0, adaptive_weight,
                          lambda: jnp.zeros((), jnp.float32))
  kl = losses.kl_loss(post.mean, post.logvar)

  reg_decoder = reg_encoder = None
  reg_metrics = {}
  if models.image_vae is not None and w.reg_decoder_weight:
    image_decode = lambda latents: models.image_vae.apply({"params": frozen["image_vae"]}, latents,
                                                          method="decode")
    reg_decoder, aux = regularizer.decoder_regularization(z, x, image_decode, w.psi, rng_psi, params["logvar_2d"])
    reg_metrics.update(aux.metrics)
  if models.image_vae is not None and w.reg_encoder_weight:
    image_encode = lambda images: models.image_vae.apply({"params": frozen["image_vae"]}, images,
                                                         method="encode").mode()
    latent = regularizer.encoder_regularization_latent(x, image_encode, w.psi, rng_psi)
    x_from_image = models.vae.apply({"params": params["vae"]}, latent, method="decode")
    reg_encoder, _ = losses.reconstruction_nll(x, x_from_image, params["logvar"], perceptual, w.perceptual_weight)

  total, metrics = losses.generator_loss(w, nll=nll, kl=kl, g_loss=g_loss, d_weight=d_weight, step=step,
                                         reg_decoder=reg_decoder, reg_encoder=reg_encoder)
  return total, {**metrics, **rec_metrics, **reg_metrics}


def discriminator_loss(disc_params, vae_params, x: Array, rng: Array, step: Array, models: Models):
  """The discriminator objective of one batch (the reconstruction is a constant here)."""
  x_hat, *_ = reconstruct(models, jax.lax.stop_gradient(vae_params), x, jax.random.split(rng)[0])
  logits_real = models.disc.apply({"params": disc_params}, x)
  logits_fake = models.disc.apply({"params": disc_params}, jax.lax.stop_gradient(x_hat))
  return losses.discriminator_loss(logits_real, logits_fake, step, models.weights.disc_start)


# ------------------------------------------------------------------------------------------------------------
# The step


def _accumulated_grads(loss_fn: Callable, params, x: Array, rng: Array, accum: int):
  """Mean loss, metrics and gradients over `accum` micro-batches of `x` (split along the batch)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, metrics), grads = grad_fn(params, x, rng)
    return loss, metrics, grads
  if x.shape[0] % accum:
    raise ValueError(f"config.train.grad_accum_steps={accum} must divide the batch size {x.shape[0]}")
  micro = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

  def body(carry, inputs):
    xi, ri = inputs
    (loss, metrics), grads = grad_fn(params, xi, ri)
    return jax.tree_util.tree_map(jnp.add, carry, (loss, metrics, grads)), None

  zero = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: (lambda o: (o[0][0], o[0][1], o[1]))(
      grad_fn(params, micro[0], rng))))
  total, _ = jax.lax.scan(body, zero, (micro, jax.random.split(rng, accum)))
  return jax.tree_util.tree_map(lambda v: v / accum, total)


def _guarded_update(tx, grads, opt_state, params, loss):
  """An optax update applied only when the loss and every gradient are finite."""
  finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g))
                                                   for g in jax.tree_util.tree_leaves(grads)]))
  safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
  updates, new_opt_state = tx.update(safe_grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), finite


class Update(enum.Enum):
  """What one step updates: the generator, the discriminator (alternating, as the original), or both."""

  GENERATOR = "generator"
  DISCRIMINATOR = "discriminator"
  BOTH = "both"


def update_for_step(step: int, alternate: bool) -> Update:
  """The update of (host-side) step `step`: G on even steps and D on odd ones when alternating, else both."""
  if not alternate:
    return Update.BOTH
  return Update.GENERATOR if step % 2 == 0 else Update.DISCRIMINATOR


def train_step(state: TrainState, batch: dict, rng: Array, frozen: dict, *, models: Models,
               update: Update = Update.BOTH):
  """One training step -> (new state, metrics). Pure; `rng` is the run's root key (folded with the step).

  `update` is static: the loop calls the generator and discriminator variants on alternate steps (two compiled
  programs; a traced `lax.cond` between them ran 2x slower than both updates together on XLA's CPU backend).
  The GAN switch at `disc_start` is traced (`losses.disc_factor`), so it never recompiles.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_g, rng_d = jax.random.split(rng)
  x = _model_input(models, batch["video"])
  step = state.step
  metrics, finite = {}, jnp.array(True)

  if update in (Update.GENERATOR, Update.BOTH):
    loss_fn = lambda p, xi, ri: generator_loss(p, state.disc_params, frozen, xi, ri, step, models)
    loss, g_metrics, grads = _accumulated_grads(loss_fn, state.params, x, rng_g, models.grad_accum_steps)
    params, opt_state, g_finite = _guarded_update(models.tx, grads, state.opt_state, state.params, loss)
    ema = state.ema_params
    if models.ema_decay > 0:
      d = models.ema_decay
      ema = jax.tree_util.tree_map(lambda e, p: jnp.where(g_finite, d * e + (1 - d) * p, e), ema, params["vae"])
    state = state.replace(params=params, opt_state=opt_state, ema_params=ema)
    metrics.update(g_metrics)
    metrics.update({"grad_norm/generator": optax.global_norm(grads), "lr/generator": models.lr_schedule(step)})
    finite &= g_finite

  if update in (Update.DISCRIMINATOR, Update.BOTH):
    loss_fn = lambda p, xi, ri: discriminator_loss(p, state.params["vae"], xi, ri, step, models)
    loss, d_metrics, grads = _accumulated_grads(loss_fn, state.disc_params, x, rng_d, models.grad_accum_steps)
    disc_params, disc_opt_state, d_finite = _guarded_update(models.disc_tx, grads, state.disc_opt_state,
                                                            state.disc_params, loss)
    state = state.replace(disc_params=disc_params, disc_opt_state=disc_opt_state)
    metrics.update(d_metrics)
    metrics.update({"grad_norm/discriminator": optax.global_norm(grads),
                    "lr/discriminator": models.disc_lr_schedule(step)})
    finite &= d_finite

  nan_skips = state.nan_skips + jnp.where(finite, 0, 1)
  nan_streak = jnp.where(finite, 0, state.nan_streak + 1)
  state = state.replace(step=step + 1, nan_skips=nan_skips, nan_streak=nan_streak)
  metrics.update({"guard/finite": finite.astype(jnp.float32), "guard/nan_skips": nan_skips.astype(jnp.float32)})
  return state, metrics


class TrainStep:
  """`train_step` jitted with explicit shardings (state donated), one program per `Update` (and input shape).

      state, metrics, update = step_fn(state, batch, rng, frozen, step)   # `step`: the host's step counter
  """

  def __init__(self, models: Models, mesh, state_shardings, frozen_shardings):
    from cvvae_jax import sharding

    self.models = models
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sh = {"video": sharding.batch_sharding(mesh)}
    self._fns = {
        update: jax.jit(functools.partial(train_step, models=models, update=update),
                        in_shardings=(state_shardings, batch_sh, replicated, frozen_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        for update in Update}

  def __call__(self, state: TrainState, batch: dict, rng: Array, frozen: dict, step: int):
    update = update_for_step(step, self.models.alternate)
    state, metrics = self._fns[update](state, batch, rng, frozen)
    return state, metrics, update


class MetricWindow:
  """Averages step metrics over a logging window on the device (no host sync until `result`)."""

  def __init__(self):
    self._sums: dict[Update, Any] = {}
    self._counts: dict[Update, int] = {}

  def add(self, update: Update, metrics: dict) -> None:
    prev = self._sums.get(update)
    self._sums[update] = metrics if prev is None else jax.tree_util.tree_map(jnp.add, prev, metrics)
    self._counts[update] = self._counts.get(update, 0) + 1

  def result(self) -> dict[str, float]:
    out = {}
    for update, sums in self._sums.items():
      n = self._counts[update]
      out.update({k: float(v) / n for k, v in jax.device_get(sums).items()})
    self._sums, self._counts = {}, {}
    return out


# ------------------------------------------------------------------------------------------------------------
# Frozen networks and initial params


def load_frozen(config: ml_collections.ConfigDict, model_kind: str):
  """(image VAE module or None, {"image_vae": params, "lpips": params}) from `config.image_vae`/`config.loss`."""
  from cvvae_jax import pretrained

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
  from cvvae_jax import inflate, pretrained

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
                                  models.vae.clone(dtype=jnp.float32, remat=False))
  if kind == "pretrained":
    if not path:
      raise ValueError("config.init_from.kind='pretrained' needs config.init_from.path")
    model, params = pretrained.load_pretrained(path)
    if pretrained.model_spec(model) != pretrained.model_spec(models.vae):
      raise ValueError(f"config.init_from.path={path!r} holds {pretrained.model_spec(model)}, but config.model "
                       f"describes {pretrained.model_spec(models.vae)}")
    return params
  raise ValueError(f"config.init_from.kind: expected 'inflate', 'pretrained' or 'scratch', got {kind!r}")


# ------------------------------------------------------------------------------------------------------------
# Pictures


def reconstruction_arrays(models: Models, params, frozen: dict, video: Array):
  """Jittable: (reconstruction as video `[B, T, H, W, 3]`, image decoder on each latent frame `[B, L, H, W, 3]`
  or None). The image decoder row exists for CV-VAE with a frozen image VAE."""
  x = _model_input(models, video)
  x_hat, post, _, _ = reconstruct(models, params["vae"], x, None)
  if not models.is_video:
    return x_hat[:, None], None
  if models.image_vae is None:
    return x_hat, None
  z = post.mode()
  b, t = z.shape[:2]
  decoded = models.image_vae.apply({"params": frozen["image_vae"]}, z.reshape(b * t, *z.shape[2:]), method="decode")
  return x_hat, decoded.reshape(b, t, *decoded.shape[1:])


def load_probe(config: ml_collections.ConfigDict, models: Models) -> np.ndarray:
  """The fixed probe clips of `train.eval_every_steps`: the valid clips of the first `train.eval_batches` batches
  of `config.data.eval`, read whole by every process (the same clips everywhere, so every process runs the same
  number of probe calls), float32 `[N, T, H, W, 3]` in [-1, 1], N a multiple of `data.eval.batch_size`; for the
  image VAE every frame is an image: `[N * T, 1, H, W, 3]`."""
  from cvvae_jax import data as data_lib

  batch = int(config.data.eval.batch_size)
  clips = []
  data_pass = iter(data_lib.create_eval_iterator(config.data, process_index=0, process_count=1))
  try:
    for _, b in zip(range(int(config.train.eval_batches)), data_pass):
      clips.extend(b["video"][b["mask"]])
  finally:
    data_pass.close()
  n = len(clips) // batch * batch
  if n == 0:
    raise ValueError(f"config.train.eval_every_steps: the eval set ({config.data.eval.source} "
                     f"{config.data.eval.path or config.data.eval.tfds_name}) gave {len(clips)} usable clips in "
                     f"{config.train.eval_batches} batches, fewer than config.data.eval.batch_size={batch}")
  probe = np.stack(clips[:n])
  if not models.is_video:
    probe = probe.reshape(-1, 1, *probe.shape[2:])
  return probe


def probe_metrics(video: np.ndarray, x_hat: np.ndarray, decoded: np.ndarray | None,
                  temporal_compression: int = 4) -> dict[str, float]:
  """Validation numbers of one probe pass (deterministic: the posterior mode), host side.

  `video`, `x_hat` `[N, T, H, W, 3]` in [-1, 1]; `decoded` `[N, L, H, W, 3]`: the frozen image decoder on each
  latent frame, scored against frame `4i` (the `slice` psi mapping; frame 0 for the first latent). Returns
  val/rec_l1, val/psnr (dB, data range 2, mean over clips) and, with `decoded`, val/reg_l1, val/reg_psnr.
  """
  def l1_psnr(a, b):
    err = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = np.mean(err ** 2, axis=tuple(range(1, err.ndim)))
    return float(np.mean(np.abs(err))), float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12))))

  out = dict(zip(("val/rec_l1", "val/psnr"), l1_psnr(x_hat, video)))
  if decoded is not None:
    target = np.asarray(video)[:, ::temporal_compression]
    out.update(zip(("val/reg_l1", "val/reg_psnr"), l1_psnr(decoded, target)))
  return out


def reconstruction_grid(video: np.ndarray, x_hat: np.ndarray, decoded: np.ndarray | None,
                        temporal_compression: int = 4, max_frames: int = 9) -> np.ndarray:
  """uint8 `[rows * H, frames * W, 3]`: per example, input / reconstruction / image decoder on the latent.

  The third row shows the frozen image decoder's output for latent frame i under frame 4i (frame 0, then the
  last frame of each 4-frame group, i.e. what the `slice` psi mapping compares it with); other slots are black.
  """
  rows = [np.asarray(video), np.asarray(x_hat)]
  if decoded is not None:
    row = np.full_like(rows[0], -1.0)
    row[:, ::temporal_compression] = np.asarray(decoded)
    rows.append(row)
  frames = min(max_frames, rows[0].shape[1])
  lines = [np.concatenate(list(r[i, :frames]), axis=1) for i in range(rows[0].shape[0]) for r in rows]
  grid = np.concatenate(lines, axis=0)
  return np.clip((grid + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def plot_curves(path: str, history: dict[str, list[tuple[int, float]]], keys: tuple[str, ...]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = [k for k in keys if history.get(k)]
  if not keys:
    return
  cols = min(len(keys), 5)
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.axis("off")
  for ax, key in zip(axes.flat, keys):
    steps, values = zip(*history[key])
    ax.plot(steps, values)
    ax.set_title(key)
    ax.set_xlabel("step")
    if min(values) > 0:
      ax.set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# The loop


def _versions() -> dict[str, str]:
  import flax as flax_mod, optax as optax_mod, orbax.checkpoint as ocp
  return {"jax": jax.__version__, "flax": flax_mod.__version__, "optax": optax_mod.__version__,
          "orbax-checkpoint": ocp.__version__}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config` in `workdir` (resuming its latest checkpoint); returns the final state."""
  from clu import metric_writers, periodic_actions

  from cvvae_jax import checkpoint, data as data_lib, pretrained, sharding

  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  validate_config(config)
  if config.optim.generator.total_steps != config.train.num_steps:
    logging.warning("config.optim.generator.total_steps=%d differs from config.train.num_steps=%d: the generator's "
                    "cosine schedule does not end at the last step (override both together)",
                    config.optim.generator.total_steps, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  for name, stream in config.data.streams.items():
    sharding.check_batch_divisible(stream.batch_size, mesh, f"config.data.streams.{name}.batch_size")
  is_lead = jax.process_index() == 0

  # Models and frozen networks.
  image_vae, frozen_host = load_frozen(config, config.model.kind)
  models = build_models(config, image_vae)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen_sh = sharding.param_shardings(jax.eval_shape(lambda: frozen_host), mesh)
  frozen = jax.device_put(frozen_host, frozen_sh)

  # State: shapes first, then shardings, then restore or initialise.
  root = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(functools.partial(init_state, models), root)
  state_sh = sharding.state_shardings(abstract, mesh)
  manager = checkpoint.CheckpointManager(
      workdir, save_interval_steps=config.train.checkpoint_every_steps, max_to_keep=config.train.keep_checkpoints,
      enable_async_checkpointing=config.train.async_checkpoints)
  restored = manager.restore_latest(sharding.with_shardings(abstract, state_sh))
  if restored is not None:
    state, meta = restored
    logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), int(state.step))
  else:
    vae_params = initial_vae_params(config, models, frozen_host)
    if vae_params is not None:
      vae_sh = sharding.param_shardings(jax.eval_shape(lambda: vae_params), mesh)
      vae_params = jax.device_put(vae_params, vae_sh)
    state = jax.jit(functools.partial(init_state, models), out_shardings=state_sh)(root, vae_params)
  start_step = int(state.step)

  step_fn = TrainStep(models, mesh, state_sh, frozen_sh)
  grid_fn = jax.jit(functools.partial(reconstruction_arrays, models), out_shardings=replicated)
  meta = {"model": pretrained.model_spec(models.vae), "config": json.loads(config.to_json_best_effort()),
          "versions": _versions()}
  if image_vae is not None:
    meta["image_vae"] = {"path": config.image_vae.path, "model": pretrained.model_spec(image_vae)}

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead)
  if start_step == 0 and is_lead:
    writer.write_hparams({k: v for k, v in _flat_config(config).items()})
  num_steps = int(config.train.num_steps)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=
                                           config.train.log_every_steps)
  reached_preemption = checkpoint.install_preemption_handler()
  history: dict[str, list[tuple[int, float]]] = {}
  batches = data_lib.create_train_iterator(config.data, seed=config.data.seed, start_step=start_step)
  t0, examples, picture_batch, window = time.time(), 0, None, MetricWindow()
  probe = load_probe(config, models) if config.train.eval_every_steps > 0 else None

  def record(at_step: int, scalars: dict[str, float]) -> None:
    writer.write_scalars(at_step, scalars)
    for k, v in scalars.items():
      history.setdefault(k, []).append((at_step, v))

  def reconstruct_process0(clips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(process 0's `clips`, reconstruction, image decoder rows) with the current params: a collective, every
    process calls it and runs the (sharded) reconstruction on process 0's clips."""
    clips = _process0_array(clips)
    x_hat, decoded = jax.device_get(grid_fn(state.params, frozen, jax.make_array_from_callback(
        clips.shape, replicated, lambda index: clips[index])))
    return clips, x_hat, decoded

  def run_probe(at_step: int) -> None:
    """Probe metrics of the current params (all processes make the same calls; process 0 logs)."""
    chunk = int(config.data.eval.batch_size)
    parts = [reconstruct_process0(probe[i:i + chunk]) for i in range(0, len(probe), chunk)]
    x_hat = np.concatenate([p[1] for p in parts])
    decoded = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    scalars = probe_metrics(probe, x_hat, decoded, getattr(models.vae, "temporal_compression", 1))
    record(at_step, scalars)
    logging.info("step %d probe (%d fixed clips): %s", at_step, len(probe),
                 ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

  if probe is not None and start_step == 0:
    run_probe(0)
  logging.info("training %s for %d steps on mesh %s from step %d", type(models.vae).__name__, num_steps,
               dict(mesh.shape), start_step)
  step = start_step
  try:
    while step < num_steps:
      batch = next(batches)
      video = sharding.shard_host_batch({"video": batch["video"]}, mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics, update = step_fn(state, video, root, frozen, step)
      window.add(update, metrics)
      step += 1
      examples += batch["video"].shape[0] * jax.process_count()
      report(step)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        if int(state.nan_streak) >= config.train.max_nan_steps:
          manager.wait_until_finished()
          raise FloatingPointError(
              f"{int(state.nan_streak)} consecutive steps (up to {step}) had non-finite loss or gradients and "
              f"were skipped (config.train.max_nan_steps={config.train.max_nan_steps}); the last good "
              f"checkpoint is step {manager.latest_step()} in {checkpoint.checkpoint_dir(workdir)}")
        elapsed = time.time() - t0
        scalars = window.result()
        scalars.update({"perf/examples_per_s": examples / elapsed, "perf/steps_per_s": (step - start_step) / elapsed})
        record(step, scalars)
        eta = (num_steps - step) / max(scalars["perf/steps_per_s"], 1e-9)
        logging.info("step %d/%d (%.0f%%) loss %.4g nll %.4g reg %.4g | %.2f steps/s, ETA %.0fs", step, num_steps,
                     100 * step / num_steps, scalars.get("loss/total", np.nan), scalars.get("loss/nll", np.nan),
                     scalars.get("loss/reg_decoder", np.nan), scalars["perf/steps_per_s"], eta)
      if batch["video"].shape[1] > 1 or not models.is_video:
        picture_batch = batch["video"][:2]  # the latest clip batch (CV-VAE) or image batch, for pictures
      if step % config.train.image_every_steps == 0 and picture_batch is not None:
        pictures, x_hat, decoded = reconstruct_process0(picture_batch)  # every process; process 0 writes
        if is_lead:
          grid = reconstruction_grid(pictures, x_hat, decoded)
          save_png(os.path.join(workdir, "images", f"reconstruction_{step:07d}.png"), grid)
          writer.write_images(step, {"reconstruction": grid[None]})
      if probe is not None and (step % config.train.eval_every_steps == 0 or step == num_steps):
        run_probe(step)
      preempted = reached_preemption(step)
      if manager.should_save(step) or step == num_steps or preempted:
        manager.save(step, state, {**meta, "data": batches.state()}, force=True)
      if preempted:
        logging.warning("preemption signal: saved step %d, exiting", step)
        break
  finally:
    manager.wait_until_finished()
    batches.close()
    writer.flush()
  if is_lead and history:
    plot_curves(os.path.join(workdir, "loss_curves.png"), history,
                ("loss/total", "loss/nll", "rec/l1", "loss/reg_decoder", "loss/kl", "disc/loss", "val/rec_l1",
                 "val/reg_l1", "val/psnr", "val/reg_psnr"))
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump(history, f)
  return state


def _process0_array(x: np.ndarray) -> np.ndarray:
  """Process 0's `x` on every process (a collective: all processes call it); `x` itself with one process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def _flat_config(config) -> dict[str, Any]:
  from flax import traverse_util
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


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
