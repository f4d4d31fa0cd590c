"""The pictures of an evaluation: per-frame curves, per-clip histograms, sample strips (PNG, mp4), error maps.

Plots draw on `matplotlib.figure.Figure` directly (no pyplot: no global backend, no open figures)."""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from cvvae_jax.data import media
from cvvae_jax.eval.accumulator import Accumulator
from cvvae_jax.eval.config import EvalConfig
from cvvae_jax.eval.models import Models
from cvvae_jax.models.psi import PsiMapping, psi

ERROR_MAP_RANGE = 0.25  # error maps: mean |a - b| over RGB in [0, 1] units, full colour at this value
MIN_SAMPLE_HEIGHT = 96  # sample strips enlarge smaller frames by an integer factor


PLOTS = ["per_frame.png", "per_clip_hist.png"]  # always written; compat_group.png with clips of a latent group


def plot_group_offsets(path: str, acc: Accumulator) -> bool:
  """The image decoder on latent i >= 1 against each frame 4(i-1)+j of its group: mean PSNR over clips and latents
  per j with its 95% CI (where in the 4-frame group the latent is most compatible). False: nothing to plot."""
  names = sorted(k for k in acc.values if k.startswith("compat/group_offset/"))
  if not names:
    return False
  offsets = [int(k.rsplit("/", 1)[1]) for k in names]
  summaries = [acc.summary(k, "psnr") for k in names]
  fig = Figure(figsize=(5, 3.2))
  ax = fig.subplots()
  ax.errorbar(offsets, [s["mean"] for s in summaries], yerr=[np.nan_to_num(s["ci95"]) for s in summaries],
              marker="o", capsize=3)
  ax.set_xticks(offsets, [f"4(i-1)+{j}" for j in offsets])
  ax.set_xlabel("frame of latent i's group")
  ax.set_ylabel("PSNR of the image decoder (dB)")
  ax.set_title("Where in its group a CV-VAE latent is an image latent")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def plot_per_frame(path: str, acc: Accumulator, models: Models, metric_names: Sequence[str], tc: int) -> None:
  fig = Figure(figsize=(8, 2.6 * len(metric_names)))
  axes = fig.subplots(len(metric_names), 1, sharex=True, squeeze=False)
  for ax, metric in zip(axes[:, 0], metric_names):
    t = 1
    for key in models.recon_keys():
      s = acc.summary(f"recon/{key}", metric)
      mean, ci = np.asarray(s["per_frame_mean"]), np.nan_to_num(np.asarray(s["per_frame_ci95"]))
      x = np.arange(len(mean))
      t = max(t, len(mean))
      line, = ax.plot(x, mean, marker="o", ms=3, label=models.entries[key].label())
      ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
    if models.compat:
      for p in ("slice", "mean"):
        name = f"compat/cv_latent_image_decoder/{p}"
        if name in acc.values:
          mean = np.asarray(acc.summary(name, metric)["per_frame_mean"])
          ax.plot(np.arange(len(mean)) * tc, mean, ls="none", marker="s" if p == "slice" else "^", ms=5,
                  label=f"image decoder on CV-VAE latent i vs psi {p} (at frame {tc}i)")
    for f in range(0, t, tc):
      ax.axvline(f, color="grey", ls=":", lw=0.8)
    ax.set_ylabel(metric.upper())
    ax.grid(alpha=0.3, axis="y")
  axes[0, 0].set_title("Per-frame scores (mean over clips, 95% CI)")
  axes[-1, 0].set_xlabel("frame index")
  axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
  axes[0, 0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_histograms(path: str, acc: Accumulator, models: Models, metric_names: Sequence[str]) -> None:
  fig = Figure(figsize=(4.2 * len(metric_names), 3.2))
  axes = fig.subplots(1, len(metric_names), squeeze=False)
  for ax, metric in zip(axes[0], metric_names):
    data = [np.clip(acc.clip_values(f"recon/{k}", metric), -1e3, 1e3) for k in models.recon_keys()]
    lo, hi = min(d.min() for d in data), max(d.max() for d in data)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, max(5, min(30, acc.num_clips)) + 1)
    for key, d in zip(models.recon_keys(), data):
      ax.hist(d, bins=bins, alpha=0.55, label=models.entries[key].label())
    ax.set_xlabel(f"per-clip {metric.upper()}")
    ax.set_ylabel("clips")
    ax.yaxis.get_major_locator().set_params(integer=True)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"Per-clip scores ({acc.num_clips} clips)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def error_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`[..., H, W, 3]` pair in [-1, 1] -> an RGB heat map `[..., H, W, 3]` in [-1, 1] of the mean |a - b| over RGB in
  [0, 1] units (clipped inputs), black at 0 and full colour at `ERROR_MAP_RANGE` or more."""
  err = np.abs(np.clip(a, -1, 1) - np.clip(b, -1, 1)).mean(axis=-1) / 2.0
  rgb = colormaps["inferno"](np.clip(err / ERROR_MAP_RANGE, 0.0, 1.0))[..., :3]
  return (rgb * 2.0 - 1.0).astype(np.float32)


def _labelled_grid(rows: Sequence[tuple[str, np.ndarray]], columns: Sequence[str], gap: int = 2) -> np.ndarray:
  """A uint8 picture: one row per (label, frames `[n, H, W, 3]` in [-1, 1]), a label band on the left and one on
  top with the column titles."""
  n, h, w = rows[0][1].shape[:3]
  zoom = max(1, math.ceil(MIN_SAMPLE_HEIGHT / h))  # small frames are enlarged (nearest) to stay readable
  rows = [(label, frames.repeat(zoom, axis=1).repeat(zoom, axis=2)) for label, frames in rows]
  h, w = h * zoom, w * zoom
  label_w, top = 8 + 6 * max(len(label) for label, _ in rows), 14
  canvas = np.full((top + len(rows) * (h + gap), label_w + n * (w + gap), 3), 255, np.uint8)
  for r, (_, frames) in enumerate(rows):
    for c in range(n):
      y, x = top + r * (h + gap), label_w + c * (w + gap)
      canvas[y:y + h, x:x + w] = media.to_uint8(frames[c])
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for r, (label, _) in enumerate(rows):
    draw.text((4, top + r * (h + gap) + max(0, h // 2 - 6)), label, fill=(0, 0, 0))
  for c, title in enumerate(columns):
    draw.text((label_w + c * (w + gap) + 2, 1), title, fill=(0, 0, 0))
  return np.asarray(image)


def _pick(num: int, at_most: int) -> np.ndarray:
  if num <= at_most:
    return np.arange(num)
  return np.unique(np.round(np.linspace(0, num - 1, at_most)).astype(int))


def write_samples(folder: str, index: int, video: np.ndarray, pictures: Mapping[str, np.ndarray], models: Models,
                  cfg: EvalConfig) -> list[str]:
  """sample_NN.png / .mp4 (input, model, baseline, error maps) and compat_NN.png for one clip `[T, H, W, 3]`."""
  os.makedirs(folder, exist_ok=True)
  written = []
  keys = [k for k in ("model", "baseline") if k in models.entries]
  cols = _pick(video.shape[0], cfg.sample_frames)
  rows = [("input", video[cols])]
  for key in keys:
    recon = pictures[f"recon/{key}"]
    rows += [(key, recon[cols]), (f"{key} error", error_map(video[cols], recon[cols]))]
  png = os.path.join(folder, f"sample_{index:02d}.png")
  Image.fromarray(_labelled_grid(rows, [f"t={t}" for t in cols])).save(png)
  written.append(png)
  if video.shape[0] > 1:
    panels = [video] + [p for key in keys for p in (pictures[f"recon/{key}"],
                                                    error_map(video, pictures[f"recon/{key}"]))]
    side = np.concatenate(panels, axis=2)
    if side.shape[1] % 2 or side.shape[2] % 2:
      side = np.pad(side, ((0, 0), (0, side.shape[1] % 2), (0, side.shape[2] % 2), (0, 0)), constant_values=1.0)
    mp4 = os.path.join(folder, f"sample_{index:02d}.mp4")
    media.write_video(mp4, side, fps=cfg.fps)
    written.append(mp4)
  if models.compat:
    tc = models.entries[models.cv_key].model.temporal_compression
    crossed = pictures["compat/cv_latent_image_decoder"]
    lat = _pick(crossed.shape[0], cfg.sample_frames)
    v = video[None]
    slice_t = np.asarray(psi(v, PsiMapping.SLICE))[0]
    mean_t = np.asarray(psi(v, PsiMapping.MEAN))[0]
    back = pictures["compat/image_latent_cv_decoder"][::tc]
    rows = [("frame 4i", slice_t[lat]), ("mean 4i-3..4i", mean_t[lat]), ("img dec(CV z_i)", crossed[lat]),
            ("error vs 4i", error_map(slice_t[lat], crossed[lat])), ("CV dec(img z_4i)", back[lat])]
    png = os.path.join(folder, f"compat_{index:02d}.png")
    Image.fromarray(_labelled_grid(rows, [f"i={i}" for i in lat])).save(png)
    written.append(png)
  return written
