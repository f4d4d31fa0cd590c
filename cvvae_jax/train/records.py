"""What a run writes besides checkpoints: its scalars (TensorBoard, via clu's writer, and `history.json`), loss
curves and reconstruction grids (PNG), into a local or `gs://` workdir (`cvvae_jax.paths`).

`history.json` is rewritten (atomically) as the run goes and, on resume, read back up to the restored step, so a
preempted and resumed run's history and curves hold every recorded step since step 0 exactly once.

TensorBoard events of a remote workdir are written to a local folder and copied to the workdir at every flush
(`create_writer`): TF's own GCS filesystem, which `tf.summary` would use for `gs://`, has the GCS endpoint built in
(it cannot be pointed at another server, e.g. a local emulator, so it could not be tested), and object stores do not
append: each copy rewrites the events objects, as TF's GCS writer would on each flush.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

from cvvae_jax import paths

HISTORY_JSON = "history.json"
CURVES_PNG = "loss_curves.png"
CHECKPOINT_FALLBACK = "checkpoint/fallback"  # events: [step resumed, [{"step", "error", "moved_to"}, ...]]

CURVES = ("loss/total", "loss/nll", "rec/l1", "loss/reg_decoder", "loss/kl", "disc/loss", "val/rec_l1", "val/reg_l1",
          "val/psnr", "val/reg_psnr")


class History:
  """Scalars by name, `{"loss/total": [(step, value), ...]}`, also handed to a clu metric `writer`."""

  def __init__(self, writer):
    self.writer = writer
    self.values: dict[str, list[tuple[int, float]]] = {}
    self.changed = False  # records since the last `save`

  def record(self, step: int, scalars: dict[str, float]) -> None:
    self.writer.write_scalars(step, scalars)
    for k, v in scalars.items():
      self.values.setdefault(k, []).append((int(step), float(v)))
    self.changed = bool(scalars) or self.changed

  def note(self, step: int, key: str, value) -> None:
    """Records a JSON event (not a scalar: not plotted, not sent to the writer), e.g. the checkpoints a resume
    skipped under `CHECKPOINT_FALLBACK`."""
    self.values.setdefault(key, []).append((int(step), value))
    self.changed = True

  def resume(self, workdir: str | os.PathLike, step: int) -> None:
    """Takes the entries of `workdir/history.json` up to `step` (the restored checkpoint's), dropping later ones:
    the steps after it run again. A missing file leaves the history empty."""
    p = paths.path(workdir) / HISTORY_JSON
    if not p.exists():
      if step > 0:
        logging.warning("no %s in %s: the history starts at the resumed step %d", HISTORY_JSON, workdir, step)
      return
    try:
      saved = json.loads(p.read_text())
    except ValueError as e:
      raise ValueError(f"{p}: expected the JSON history of this run ({{name: [[step, value], ...]}}): {e}") from e
    kept = {k: [(int(s), v) for s, v in pairs if int(s) <= step] for k, pairs in saved.items()}
    self.values = {k: pairs for k, pairs in kept.items() if pairs}
    self.changed = True

  def save(self, workdir: str | os.PathLike, curves: tuple[str, ...] | None = CURVES) -> None:
    """`workdir/history.json` and (unless `curves` is None) `workdir/loss_curves.png` of the `curves` recorded,
    each written atomically."""
    if not self.values:
      return
    root = paths.path(workdir)
    paths.write_atomic(root / HISTORY_JSON, json.dumps(self.values))
    if curves is not None:
      plot_curves(root / CURVES_PNG, self.values, curves)
    self.changed = False


class MirroredWriter(metric_writers.MultiWriter):
  """clu's default writer on a local folder whose files are copied into `target` (a remote folder) at every
  `flush` and at `close`."""

  def __init__(self, target: epath.Path, local_dir: str):
    self.target, self.local_dir = target, local_dir
    super().__init__([metric_writers.create_default_writer(local_dir, asynchronous=False)])

  def flush(self) -> None:
    super().flush()
    paths.copy_tree(self.local_dir, self.target)

  def close(self) -> None:
    try:
      self.flush()
    finally:
      super().close()
      shutil.rmtree(self.local_dir, ignore_errors=True)


def create_writer(workdir: str | os.PathLike, *, just_logging: bool = False) -> metric_writers.MetricWriter:
  """The run's metric writer: logs, plus TensorBoard events in `workdir` (unless `just_logging`, as on processes
  other than 0). A remote workdir gets its events through a local folder (`MirroredWriter`, see module doc)."""
  if just_logging or not paths.is_remote(workdir):
    return metric_writers.create_default_writer(os.fspath(workdir), just_logging=just_logging)
  return MirroredWriter(paths.path(workdir), tempfile.mkdtemp(prefix="cvvae_events_"))


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


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """uint8 `[H, W, 3]` as a PNG at `path` (local or remote), written atomically."""
  paths.save_image(Image.fromarray(image), path)


def plot_curves(path: str | os.PathLike, history: dict[str, list[tuple[int, float]]], keys: tuple[str, ...]) -> None:
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
  paths.save_figure(fig, path, dpi=80)

