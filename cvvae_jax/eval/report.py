"""The written results of an evaluation: metrics.json (`build_report`, `json_safe`) and metrics.md."""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cvvae_jax import utils
from cvvae_jax.data.sources import DataSpec
from cvvae_jax.eval.accumulator import Accumulator
from cvvae_jax.eval.config import PAPER_TABLE1, EvalConfig
from cvvae_jax.eval.models import Models
from cvvae_jax.eval.plots import ERROR_MAP_RANGE
from cvvae_jax.eval.step import series_names
from cvvae_jax.inference import api


def json_safe(value: Any) -> Any:
  """Nested values with non-finite floats as strings ("inf", "-inf", "nan"), so the file is strict JSON."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    v = float(value)
    return v if math.isfinite(v) else str(v)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  return value


def _fmt(summary: Optional[Mapping[str, Any]], metric: str, signed: bool = False) -> str:
  if not summary:
    return "–"
  digits = 2 if metric == "psnr" else 4 if metric == "lpips" else 3
  mean, ci = summary["mean"], summary["ci95"]
  sign = "+" if signed else ""
  text = f"{mean:{sign}.{digits}f}"
  if isinstance(ci, float) and math.isfinite(ci):
    text += f" ± {ci:.{digits}f}"
  return text


def _millions(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def write_markdown(path: str, report: Mapping[str, Any]) -> None:
  """metrics.md: the reconstruction table (the paper's Table 1 layout) and the compatibility table."""
  results, models, data, cfg = report["results"], report["models"], report["data"], report["config"]
  metric_names = report["metrics"]
  header_metrics = " | ".join({"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}[m] for m in metric_names)
  backbone = {"vgg": "VGG16", "alex": "AlexNet"}[cfg["lpips_net"]]
  clip = (f"{data['frames']} frames at stride {data['stride']}" if data["kind"] == "video" else "images")
  lines = [f"# Evaluation on {data['name']}", "",
           f"{data['num_clips']} {'clips' if data['kind'] == 'video' else 'images'} ({clip}, "
           f"{cfg['resolution'][0]}x{cfg['resolution'][1]}, short-side resize + centre crop); "
           f"{data['num_skipped']} input(s) skipped. Mean ± 95% CI over clips (each clip averaged over its frames). "
           f"Tiling: {cfg['tiling']}, dtype {cfg['dtype']}" + (f"; LPIPS v0.1 with the {backbone} backbone."
                                                                if "lpips" in metric_names else "."), "",
           "## Reconstruction", "",
           f"| Method | Params enc+dec | Frame compression | {header_metrics} |",
           "|---|---|---|" + "---|" * len(metric_names)]
  for key, m in models.items():
    label = f"{m['role']}: {m['class']}" + (f" {m['spec']['fields'].get('variant', '')}" if m["class"] == "CVVAE"
                                            else "") + f" (`{os.path.basename(os.path.normpath(m['path']))}`)"
    row = " | ".join(_fmt(results.get(f"recon/{key}", {}).get(mt), mt) for mt in metric_names)
    lines.append(f"| {label} | {_millions(m['params_encoder'])} + {_millions(m['params_decoder'])} | "
                 f"{m['frame_compression']}x | {row} |")
  if "model_minus_baseline" in results:
    row = " | ".join(_fmt(results["model_minus_baseline"].get(mt), mt, signed=True) for mt in metric_names)
    lines.append(f"| model − baseline (paired per clip) | | | {row} |")
  lines += _paper_rows(report, metric_names) + _fvd_lines(report)
  compat = report["compatibility"]
  lines += ["", "## Compatibility", "", f"Status: {compat['status']}."]
  if compat.get("series"):
    lines += ["", "Latents cross between the models in raw form (posterior means); the image decoder decodes each "
              "CV-VAE latent frame as an image. Latent 0 stands for frame 0, latent i for frames 4i-3..4i.", "",
              f"| Latents → decoder | Compared with | {header_metrics} |", "|---|---|" + "---|" * len(metric_names)]
    targets = {"slice": "frame 4i (psi slice)", "mean": "mean of frames 4i-3..4i (psi mean)",
               "first": "frame 0 only (psi first)"}
    ref = f"recon/{compat['image_key']}"
    for name, s in compat["series"].items():
      if name.startswith("compat/cv_latent_image_decoder/"):
        p = name.rsplit("/", 1)[1]
        what, target = "CV-VAE → image decoder", targets[p]
      elif name == "compat/image_latent_cv_decoder":
        what, target = "image VAE → CV-VAE decoder (image mode)", "every frame"
      elif name == "reference/image_vae_slice":
        what, target = "image VAE → image decoder (reference)", "frame 4i"
      else:
        continue
      row = " | ".join(_fmt(s.get(mt), mt) for mt in metric_names)
      lines.append(f"| {what} | {target} | {row} |")
    if ref in results:
      row = " | ".join(_fmt(results[ref].get(mt), mt) for mt in metric_names)
      lines.append(f"| image VAE → image decoder (reference) | every frame | {row} |")
  lines += _latent_lines(report)
  for note in report.get("notes", []):
    lines += ["", f"Note: {note}"]
  lines += ["", "Pictures: per_frame.png (per-frame means over clips, shaded 95% CI; dotted lines at frames 4i, the "
            "last frame of each latent's group), per_clip_hist.png, samples/sample_NN.png|mp4 (rows: input, model, "
            "model error, baseline, baseline error; error = mean |difference| over RGB in [0, 1] units, full colour "
            f"at {ERROR_MAP_RANGE}), samples/compat_NN.png (rows: frame 4i, mean of frames 4i-3..4i, image decoder "
            "on the CV-VAE latent, its error vs frame 4i, CV-VAE decoder on the image VAE latent of frame 4i), "
            "compat_group.png (the image decoder on latent i against each frame of its group).", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def paper_class(m: Mapping[str, Any]) -> str:
  """The paper's Table-1 row of a model's class (`PAPER_TABLE1`), from its description in the report."""
  fields = m["spec"]["fields"]
  if m["class"] == "CVVAE":
    if fields.get("variant") == "sd3":
      return "CV-VAE SD3"
    return "CV-VAE 2D+3D" if fields.get("half_3d", True) else "CV-VAE all-3D"
  return "SD3 image VAE" if m["latent_channels"] == 16 else "SD2.1 image VAE"


def _paper_rows(report: Mapping[str, Any], metric_names: Sequence[str]) -> list[str]:
  protocol = report["config"]["protocol"]
  if not protocol:
    return []
  lines = []
  for m in report["models"].values():
    name = paper_class(m)
    values = dict(zip(("psnr", "ssim", "lpips"), PAPER_TABLE1[name][protocol]))
    row = " | ".join(f"{values[mt]:.{2 if mt == 'psnr' else 3}f}" for mt in metric_names)
    lines.append(f"| reference: the paper's {name} (its {protocol} data) | | | {row} |")
  return lines


def _fvd_lines(report: Mapping[str, Any]) -> list[str]:
  fvd = report.get("fvd", {})
  lines = ["", "## rFVD", "", f"Status: {fvd.get('status', 'off')}."]
  recon = {k: v for k, v in fvd.items() if k.startswith("recon/")}
  if not recon:
    return lines
  lines += ["", f"{fvd['clips']} clips. Protocol: {fvd['protocol']}.", "",
            "| Reconstruction by | rFVD ↓ | 95% interval |", "|---|---|---|"]
  for name, entry in recon.items():
    ci = entry.get("ci95")
    interval = f"{ci[0]:.2f} – {ci[1]:.2f}" if ci else "–"
    lines.append(f"| {name.removeprefix('recon/')} | {entry['fvd']:.2f} | {interval} |")
  if fvd.get("biased"):
    lines += ["", f"Fewer than {2 * 400} clips (twice the feature dimension): the covariances are rank-deficient and "
              "rFVD is biased upwards; compare only values from the same number of clips."]
  return lines


def _latent_lines(report: Mapping[str, Any]) -> list[str]:
  stats = report.get("latent_statistics")
  lines = []
  offsets = report["compatibility"].get("group_offset_psnr")
  if offsets:
    best = max(offsets, key=lambda j: offsets[j]["mean"])
    lines += ["", "Image decoder on latent i (i >= 1) against each frame of its group, PSNR: " + ", ".join(
        f"frame 4(i-1)+{j} {offsets[j]['mean']:.2f}" for j in sorted(offsets)) + f" (best: +{best})."]
  if not stats:
    return lines
  lines += ["", "Latent statistics (raw latents, per channel over every latent position): the CV-VAE's latents "
            "against the image VAE's on the frames they stand for (frame 4i), and the KL divergence between the "
            "per-channel Gaussians.", "",
            "| Channel | CV-VAE mean | CV-VAE std | image VAE mean | image VAE std | KL(CV ‖ image) |",
            "|---|---|---|---|---|---|"]
  cv, img = stats["cv"], stats["image_slice"]
  for c in range(stats["channels"]):
    lines.append(f"| {c} | {cv['mean'][c]:+.3f} | {cv['std'][c]:.3f} | {img['mean'][c]:+.3f} | {img['std'][c]:.3f} "
                 f"| {img['kl'][c]:.4f} |")
  lines.append(f"| sum | | | | | {img['kl_sum']:.4f} (every frame: {stats['image_all']['kl_sum']:.4f}) |")
  return lines


def build_report(cfg: EvalConfig, models: Models, spec: DataSpec, acc: Accumulator, skipped: Mapping[str, Any],
                 metric_names: Sequence[str], sections: Mapping[str, Any]) -> dict[str, Any]:
  """The metrics.json content (without timing and the list of pictures). `skipped`: {"skipped": {path: reason},
  "skip_events": n} of every process; `sections`: "fvd", "latent_statistics", "devices"."""
  results: dict[str, Any] = {}
  for series in series_names(models, cfg.compat_psi):
    results[series] = {m: acc.summary(series, m) for m in metric_names}
  if models.baseline:
    results["model_minus_baseline"] = {m: acc.paired_difference("recon/model", "recon/baseline", m)
                                       for m in metric_names}
  compat: dict[str, Any] = {"status": models.compat_note, "cv_key": models.cv_key, "image_key": models.image_key}
  if models.compat:
    tc = models.entries[models.cv_key].model.temporal_compression
    series = {k: v for k, v in results.items() if k.startswith("compat/")}
    series["reference/image_vae_slice"] = {m: acc.summary(f"recon/{models.image_key}", m, frames=slice(None, None, tc))
                                           for m in metric_names}
    compat["series"] = series
    offsets = sorted(k for k in acc.values if k.startswith("compat/group_offset/"))
    if offsets:
      compat["group_offset_psnr"] = {int(k.rsplit("/", 1)[1]): acc.summary(k, "psnr") for k in offsets}
  video = spec.kind == "video"
  names = series_names(models, cfg.compat_psi)
  clip_values = {s: {m: acc.clip_values(s, m) for m in metric_names} for s in names}
  per_clip = [{"path": p, **{s: {m: float(clip_values[s][m][i]) for m in metric_names} for s in names}}
              for i, p in enumerate(acc.paths)]
  return {
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "config": cfg.to_json(),
      "tiling": {key: str(cfg.tiling_config().resolve(api.original_settings(e.model)))
                 for key, e in models.entries.items()},  # in original mode, each model's own sizes
      "versions": utils.versions(),
      "metrics": list(metric_names),
      "metric_definitions": {
          "psnr": "dB on [0, 1] frames (clipped), per frame (cvvae_jax.metrics.psnr)",
          "ssim": "Gaussian 11x11 sigma 1.5 on [0, 1] frames, per frame (cvvae_jax.metrics.ssim)",
          "lpips": f"LPIPS v0.1 per frame, {'AlexNet' if cfg.lpips_net == 'alex' else 'VGG16'} backbone "
                   "(cvvae_jax.models.lpips)",
          "rfvd": "see fvd.protocol",
          "mean/ci95": "mean over clips of each clip's mean over frames; 95% CI half-width 1.96 std/sqrt(n)",
      },
      "models": {k: {"role": e.role, **e.describe()} for k, e in models.entries.items()},
      "data": {**dataclasses.asdict(spec), "name": spec.name, "frames": cfg.frames if video else 1,
               "stride": cfg.stride if video else 1, "num_clips": acc.num_clips, "num_skipped": len(skipped["skipped"]),
               "skip_events": skipped["skip_events"], "skipped": skipped["skipped"]},
      "results": results,
      "compatibility": compat,
      **sections,
      "notes": list(models.notes),
      "per_clip": per_clip,
  }
