"""What a run writes besides checkpoints: its scalars (TensorBoard, via clu's writer, and `history.json`), loss
curves and reconstruction grids (PNG)."""
from __future__ import annotations

import json
import os

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

CURVES = ("loss/total", "loss/nll", "rec/l1", "loss/reg_decoder", "loss/kl", "disc/loss", "val/rec_l1", "val/reg_l1",
          "val/psnr", "val/reg_psnr")


class History:
  """Scalars by name, `{"loss/total": [(step, value), ...]}`, also handed to a clu metric `writer`."""

  def __init__(self, writer):
    self.writer = writer
    self.values: dict[str, list[tuple[int, float]]] = {}

  def record(self, step: int, scalars: dict[str, float]) -> None:
    self.writer.write_scalars(step, scalars)
    for k, v in scalars.items():
      self.values.setdefault(k, []).append((step, v))

  def save(self, workdir: str, curves: tuple[str, ...] = CURVES) -> None:
    """`workdir/loss_curves.png` (the `curves` recorded) and `workdir/history.json`."""
    if not self.values:
      return
    plot_curves(os.path.join(workdir, "loss_curves.png"), self.values, curves)
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump(self.values, f)


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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def plot_curves(path: str, history: dict[str, list[tuple[int, float]]], keys: tuple[str, ...]) -> None:
  """A grid of one curve per recorded key (log scale when all values are positive)."""
  keys = [k for k in keys if history.get(k)]
  if not keys:
    return
  cols = min(len(keys), 5)
  rows = -(-len(keys) // cols)
  fig = Figure(figsize=(4 * cols, 3 * rows))  # no pyplot: no global backend, no open figures
  axes = fig.subplots(rows, cols, squeeze=False)
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

