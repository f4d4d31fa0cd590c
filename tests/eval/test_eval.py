"""Tests of cvvae_jax/eval/ and evaluate.py: aggregation, psi alignment, pairing of scores, errors before any
work, and the CLI on tiny golden models and real clips (PSNR/SSIM/LPIPS themselves: test_metrics.py, test_lpips.py)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cvvae_jax import CVVAE, metrics
from cvvae_jax.data import embedded, media, sources
from cvvae_jax.inference import api
from cvvae_jax.eval import accumulator, cli, config, data as eval_data, models as eval_models, report, run, step
from cvvae_jax.models import lpips
from cvvae_jax.models.psi import PsiMapping
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _video(b=2, t=9, h=16, w=16, seed=0):
  """Clips whose frames all differ (a texture plus a per-frame offset)."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(-0.5, 0.5, (b, 1, h, w, 3))
  return jnp.asarray(base + np.linspace(-0.4, 0.4, t)[None, :, None, None, None], jnp.float32)


# --------------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------------


def test_accumulator_drops_masked_rows_limits_and_summarises():
  acc = accumulator.Accumulator()
  model = np.array([[10.0, 20.0, 30.0], [99.0, 99.0, 99.0], [40.0, 40.0, 40.0]])
  base = np.array([[9.0, 19.0, 29.0], [0.0, 0.0, 0.0], [41.0, 41.0, 41.0]])
  added = acc.add({"recon/model": {"psnr": model}, "recon/baseline": {"psnr": base}}, ["a", "pad", "c"],
                  [True, False, True], limit=3)
  assert added == 2
  added = acc.add({"recon/model": {"psnr": np.array([[0.0, 0.0, 6.0], [5.0, 5.0, 5.0]])},
                   "recon/baseline": {"psnr": np.array([[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])}}, ["d", "e"],
                  [True, True], limit=3)
  assert added == 1 and acc.num_clips == 3 and acc.paths == ["a", "c", "d"]
  np.testing.assert_allclose(acc.clip_values("recon/model", "psnr"), [20.0, 40.0, 2.0])
  s = acc.summary("recon/model", "psnr")
  clips = np.array([20.0, 40.0, 2.0])
  assert s["n"] == 3 and s["mean"] == pytest.approx(clips.mean())
  assert s["ci95"] == pytest.approx(1.96 * clips.std(ddof=1) / math.sqrt(3))
  np.testing.assert_allclose(s["per_frame_mean"], [50 / 3, 20.0, 76 / 3])
  np.testing.assert_allclose(acc.summary("recon/model", "psnr", frames=slice(None, None, 2))["per_frame_mean"],
                             [50 / 3, 76 / 3])
  d = acc.paired_difference("recon/model", "recon/baseline", "psnr")
  diffs = clips - np.array([19.0, 41.0, 1.0])
  assert d["mean"] == pytest.approx(diffs.mean()) and d["ci95"] == pytest.approx(1.96 * diffs.std(ddof=1) / 3 ** .5)
  assert acc.add({"recon/model": {"psnr": model}}, ["x", "y", "z"], [True] * 3, limit=3) == 0
  with pytest.raises(ValueError, match=r"expected recon/model/psnr scores \[B=2, T\]"):
    acc.add({"recon/model": {"psnr": np.zeros((3, 3))}}, ["x", "y"], [True, True])


def test_json_safe_makes_strict_json():
  value = {"a": np.float32(np.inf), "b": [float("nan"), np.int64(3)], "c": np.arange(2.0), 1: -np.inf}
  out = report.json_safe(value)
  assert out == {"a": "inf", "b": ["nan", 3], "c": [0.0, 1.0], "1": "-inf"}
  json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# Compatibility: which frames each latent stands for.
# --------------------------------------------------------------------------------------------------


def test_align_compat_pairs_latent_i_with_frames_4i_minus_3_to_4i():
  video = _video(t=9)  # latents: 0 <- frame 0, 1 <- frames 1..4, 2 <- frames 5..8
  v = np.asarray(video)
  exact_slice = video[:, jnp.array([0, 4, 8])]
  targets, outputs = step.align_compat(exact_slice, video, PsiMapping.SLICE)
  np.testing.assert_array_equal(np.asarray(targets), v[:, [0, 4, 8]])
  np.testing.assert_array_equal(np.asarray(outputs), np.asarray(exact_slice))
  assert np.all(np.isinf(np.asarray(metrics.psnr(targets, outputs))))

  group_means = jnp.stack([video[:, 0], video[:, 1:5].mean(1), video[:, 5:9].mean(1)], axis=1)
  targets, _ = step.align_compat(group_means, video, PsiMapping.MEAN)
  np.testing.assert_allclose(np.asarray(targets), np.asarray(group_means), atol=1e-6)
  # A decode of the wrong frames (the first frame of each group) does not pass as SLICE.
  shifted = video[:, jnp.array([0, 1, 5])]
  targets, outputs = step.align_compat(shifted, video, PsiMapping.SLICE)
  per_latent = np.asarray(metrics.psnr(targets, outputs))
  assert np.isinf(per_latent[:, 0]).all() and np.isfinite(per_latent[:, 1:]).all()

  targets, outputs = step.align_compat(exact_slice, video, PsiMapping.FIRST)
  assert targets.shape == outputs.shape == (2, 1, 16, 16, 3)
  with pytest.raises(ValueError, match=r"expected decoded latent frames \[B, 1\+k"):
    step.align_compat(video, video, PsiMapping.SLICE)


def test_score_pairs_keeps_each_series_frames_apart():
  a, b = _video(t=5, seed=1), _video(t=5, seed=2)
  c = _video(t=2, seed=3)
  pairs = {"x": (a, b), "y": (a[:, ::4], c)}
  got = step.score_pairs(pairs, None)
  assert set(got["x"]) == {"psnr", "ssim"}
  for name, (ref, out) in pairs.items():
    assert got[name]["psnr"].shape == ref.shape[:2]
    np.testing.assert_allclose(got[name]["psnr"], metrics.psnr(ref, out), rtol=1e-6)
    np.testing.assert_allclose(got[name]["ssim"], metrics.ssim(ref, out), rtol=1e-5, atol=1e-6)
  # LPIPS through the grouped path (14 frames, 2 per call): zero exactly where the pair is identical.
  score = jax.jit(lambda p, x, y, z: step.score_pairs({"same": (x, x), "other": (y, z)}, p, frames_per_call=4))
  got = score(lpips.load_lpips_params(), a, a[:, ::4], c)
  np.testing.assert_allclose(got["same"]["lpips"], 0.0, atol=1e-6)
  assert got["same"]["lpips"].shape == (2, 5) and np.all(np.asarray(got["other"]["lpips"]) > 1e-3)


# --------------------------------------------------------------------------------------------------
# Settings and errors before any work.
# --------------------------------------------------------------------------------------------------


def test_frame_metrics_with_lpips():
  params = lpips.load_lpips_params()
  x, y = helpers.astronaut_videos(b=1, t=2, h=32, w=32)
  out = jax.jit(step.frame_metrics)(jnp.asarray(x), jnp.asarray(y), params)
  assert set(out) == {"psnr", "ssim", "lpips"}
  assert all(v.shape == (1, 2) for v in out.values())
  np.testing.assert_allclose(np.asarray(out["lpips"]),
                             np.asarray(lpips.lpips_distance(params, jnp.asarray(x[0]), jnp.asarray(y[0])))[None],
                             rtol=1e-5, atol=1e-7)
  assert set(step.frame_metrics(jnp.asarray(x), jnp.asarray(y))) == {"psnr", "ssim"}
  with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
    step.frame_metrics(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))


def test_settings_are_checked():
  assert config.parse_resolution("256") == (256, 256)
  assert config.parse_resolution("32x48") == (32, 48)
  assert config.parse_resolution(64) == (64, 64)
  with pytest.raises(config.EvaluationError, match="resolution: expected 256 or HxW"):
    config.parse_resolution("big")
  with pytest.raises(config.EvaluationError) as e:
    config.EvalConfig(model="m", data="d", out="o", frames=0, chunk=16, compat_psi=("random",))
  text = str(e.value)
  assert "frames: expected >= 1, got 0" in text and "chunk: expected 1 + 4m" in text and "'random'" in text


def test_original_mode_takes_each_models_own_tile_sizes_unless_given():
  """`--tiling original` leaves the sizes to the model (its config.json's tile_spatial_size, ...); explicit ones win;
  the other modes keep the defaults (576-pixel tiles, 17-frame chunks)."""
  vae72 = CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), layers_per_block=1, original_tile_size=72,
                original_round_frames=4)

  def tiling(*flags):
    args = cli.parse_args(["--model", "m", "--data", "d", "--out", "o", *flags])
    fields = {f.name for f in dataclasses.fields(config.EvalConfig)}
    cfg = config.EvalConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return cfg.tiling_config().resolve(api.original_settings(vae72))

  original = tiling("--tiling", "original")
  assert (original.tile_size, original.encode_chunk_frames, original.decode_chunk_latents) == (72, 5, 2)
  assert tiling("--tiling", "original", "--tile", "144").tile_size == 144
  tiled = tiling()
  assert (tiled.tile_size, tiled.encode_chunk_frames, tiled.overlap) == (576, 17, 0.2222)


def test_resolve_data_kinds(tmp_path, embedded_src):
  videos, images, junk = tmp_path / "v", tmp_path / "i", tmp_path / "j"
  for folder, name in ((videos, "a.mp4"), (images, "b.png"), (junk, "c.txt")):
    folder.mkdir()
    (folder / name).write_bytes(b"x")
  (videos / "also.png").write_bytes(b"x")

  def spec(data, **kw):
    return eval_data.resolve_data(config.EvalConfig(model="m", data=str(data), out="o", **kw))

  assert (spec(videos).kind, spec(videos).source) == ("video", "folder")
  assert spec(images).kind == "image"
  assert spec(videos, data_kind="image").kind == "image"
  assert spec("embedded:image") == sources.DataSpec(kind="image", source="embedded", split="train")
  # the embedded clips: the held-out ones unless a split is named, as for any TFDS dataset
  assert spec("embedded") == sources.DataSpec(kind="video", source="embedded", split="validation")
  assert spec("embedded", split="train").split == "train"
  with pytest.raises(config.EvaluationError, match=r"expected a split in \['train', 'validation'\], got 'test'"):
    spec("embedded", split="test")
  with pytest.raises(config.EvaluationError, match="found 1 file"):
    spec(junk)
  with pytest.raises(config.EvaluationError, match="got a file"):
    spec(videos / "a.mp4")
  tfds_dir = os.path.join(os.path.dirname(embedded_src), "tfds")
  prepared = spec("cvvae_image_folder", data_dir=tfds_dir)
  assert (prepared.kind, prepared.source, prepared.split, prepared.data_key) == ("image", "tfds", "train", "data")
  assert spec("cvvae_video_folder", data_dir=tfds_dir).kind == "video"
  with pytest.raises(config.EvaluationError, match="not a folder, and not a TFDS dataset"):
    spec("no_such_dataset_for_cvvae_tests")


def test_mismatched_models_fail_before_any_work(golden, tmp_path):
  out = tmp_path / "out"
  missing = str(tmp_path / "no_data_here")  # never opened: the models are checked first
  cfg = config.EvalConfig(model=golden["cvvae_sd21_tiny"], image_vae=golden["sd3_image_vae_tiny"],
                              data=missing, out=str(out))
  with pytest.raises(config.EvaluationError, match=r"makes 4-channel latents.*decodes 16-channel latents"):
    run.evaluate(cfg)
  with pytest.raises(config.EvaluationError, match="expected an image VAE"):
    eval_models.load_models(config.EvalConfig(model=golden["sd21_image_vae_tiny"],
                                                 image_vae=golden["cvvae_sd21_tiny"], data=missing, out=str(out)))
  videos = tmp_path / "videos"
  videos.mkdir()
  media.write_video(str(videos / "a.mp4"), np.zeros((8, 32, 48, 3), np.uint8))
  cfg = config.EvalConfig(model=golden["cvvae_sd21_tiny"], baseline=golden["sd21_image_vae_tiny"],
                              data=str(videos), out=str(out), frames=6, resolution=(30, 48))
  with pytest.raises(config.EvaluationError) as e:
    run.evaluate(cfg)
  assert "expected --frames = 1 + 4k" in str(e.value) and "multiples of 8, got 30x48" in str(e.value)
  models = eval_models.load_models(config.EvalConfig(model=golden["cvvae_sd21_tiny"], image_vae="none",
                                                        baseline=golden["sd3_image_vae_tiny"], data=missing,
                                                        out=str(out)))
  assert not models.compat and "none" in models.compat_note
  assert not out.exists()


def test_image_vae_recorded_in_a_training_workdir(tmp_path):
  from cvvae_jax.train import checkpoint
  assert eval_models.recorded_image_vae(str(tmp_path)) == ""
  with checkpoint.CheckpointManager(str(tmp_path), enable_async_checkpointing=False) as ckpt:
    ckpt.save(1, {"x": np.zeros(2, np.float32)}, {"config": {"image_vae": {"path": "/weights/sd21_vae"}}}, force=True)
  assert eval_models.recorded_image_vae(str(tmp_path)) == "/weights/sd21_vae"


# --------------------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------------------


def _two_real_and_one_broken(embedded_src, kind, data, broken_name, broken_bytes):
  """A folder with the first two embedded `kind` files ("video" | "image") and one unreadable file."""
  data.mkdir()
  folder = embedded.split_folder(embedded_src, kind)
  for name in sorted(os.listdir(folder))[:2]:
    shutil.copy(os.path.join(folder, name), data / name)
  (data / broken_name).write_bytes(broken_bytes)
  return data


def test_cli_on_tiny_models_and_real_clips(golden, embedded_src, tmp_path):
  data = _two_real_and_one_broken(embedded_src, "video", tmp_path / "clips", "broken.mp4", b"not a video at all")
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), f"--model={golden['cvvae_sd21_tiny']}",
         f"--baseline={golden['sd21_image_vae_tiny']}", f"--data={data}", f"--out={out}", "--frames=5", "--stride=2",
         "--resolution=32x48", "--batch_size=2", "--num_samples=1", "--sample_frames=3"]
  env = {**os.environ, "PYTHONPATH": REPO}
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| Method | Params enc+dec | Frame compression | PSNR ↑ | SSIM ↑ | LPIPS ↓ |" in run.stdout
  assert "evaluate: 100%" in run.stderr  # the progress bar

  report = json.loads((out / "metrics.json").read_text())
  assert report["config"]["frames"] == 5 and report["config"]["resolution"] == [32, 48]
  assert report["versions"]["jax"] and report["models"]["model"]["class"] == "CVVAE"
  assert report["data"]["num_clips"] == 2 and report["data"]["num_skipped"] == 1
  assert any(p.endswith("broken.mp4") for p in report["data"]["skipped"])
  assert len(report["per_clip"]) == 2
  results = report["results"]
  for key in ("recon/model", "recon/baseline"):
    r = results[key]
    assert 3.0 < r["psnr"]["mean"] < 60.0 and -1.0 <= r["ssim"]["mean"] <= 1.0 and 0.0 <= r["lpips"]["mean"] < 2.0
    assert r["psnr"]["n"] == 2 and len(r["psnr"]["per_frame_mean"]) == 5 and r["psnr"]["ci95"] > 0
    clips = [c[key]["psnr"] for c in report["per_clip"]]
    assert r["psnr"]["mean"] == pytest.approx(np.mean(clips))
  assert results["model_minus_baseline"]["psnr"]["mean"] == pytest.approx(
      results["recon/model"]["psnr"]["mean"] - results["recon/baseline"]["psnr"]["mean"])
  compat = report["compatibility"]
  assert compat["cv_key"] == "model" and compat["image_key"] == "baseline"
  for p in ("slice", "mean"):
    s = compat["series"][f"compat/cv_latent_image_decoder/{p}"]
    assert len(s["psnr"]["per_frame_mean"]) == 2 and 3.0 < s["psnr"]["mean"] < 60.0
  # Latent 0 stands for frame 0 under every psi mapping.
  assert (compat["series"]["compat/cv_latent_image_decoder/slice"]["psnr"]["per_frame_mean"][0] ==
          pytest.approx(compat["series"]["compat/cv_latent_image_decoder/mean"]["psnr"]["per_frame_mean"][0]))
  assert len(compat["series"]["compat/image_latent_cv_decoder"]["ssim"]["per_frame_mean"]) == 5
  # The reference for SLICE is the image VAE (here the baseline) at frames 0 and 4.
  np.testing.assert_allclose(compat["series"]["reference/image_vae_slice"]["lpips"]["per_frame_mean"],
                             np.asarray(results["recon/baseline"]["lpips"]["per_frame_mean"])[[0, 4]], rtol=1e-9)

  md = (out / "metrics.md").read_text()
  assert "model: CVVAE sd21" in md and "baseline: ImageVAE" in md and "| CV-VAE → image decoder | frame 4i" in md
  assert "1 input(s) skipped" in md
  for name in ("per_frame.png", "per_clip_hist.png", "samples/sample_00.png", "samples/compat_00.png"):
    with Image.open(out / name) as im:
      assert im.size[0] > 100 and im.size[1] > 100, name
  assert not (out / "samples" / "sample_01.png").exists()
  clip = media.read_video(str(out / "samples" / "sample_00.mp4"))
  assert clip.shape == (5, 32, 48 * 5, 3)  # input | model | model error | baseline | baseline error
  assert set(report["pictures"]) == {"per_frame.png", "per_clip_hist.png", "samples/sample_00.png",
                                     "samples/sample_00.mp4", "samples/compat_00.png", "compat_group.png"}
  assert report["fvd"]["status"].startswith("off: I3D needs clips of >= 9 frames")  # 5 frames


@pytest.mark.slow  # I3D on every clip and reconstruction: two minutes on 2 cores
def test_rfvd_lpips_alex_and_latent_statistics(golden, embedded_src, tmp_path):
  out = tmp_path / "out"
  report = run.evaluate(config.EvalConfig(
      model=golden["cvvae_sd21_tiny"], baseline=golden["sd21_image_vae_tiny"], data="embedded:video", out=str(out),
      frames=9, stride=2, resolution=(32, 48), batch_size=2, max_clips=3, lpips_net="alex", fvd_bootstrap=20,
      num_samples=0, progress=False))
  assert report["data"]["num_clips"] == 3 and report["devices"] == {"devices": 2, "processes": 1}
  fvd = report["fvd"]
  assert fvd["status"].startswith("on") and fvd["clips"] == 3 and fvd["biased"] and "224x224" in fvd["protocol"]
  for key in ("recon/model", "recon/baseline"):
    lo, hi = fvd[key]["ci95"]
    assert np.isfinite(fvd[key]["fvd"]) and fvd[key]["fvd"] > 0 and lo <= fvd[key]["fvd"] <= hi
  features = np.load(out / "features.npz")
  assert features["input"].shape == features["recon_model"].shape == (3, 400) and len(features["paths"]) == 3
  # The features are those of the step: FVD from the saved features equals the report's.
  from cvvae_jax.eval import fvd as fvd_lib
  assert fvd_lib.fvd(features["input"], features["recon_model"]) == pytest.approx(fvd["recon/model"]["fvd"])
  assert "AlexNet" in report["metric_definitions"]["lpips"] and 0 < report["results"]["recon/model"]["lpips"]["mean"]
  stats = report["latent_statistics"]
  assert stats["channels"] == 4 and stats["positions"]["cv"] == 3 * 3 * 4 * 6  # 3 clips x 3 latents x 4 x 6
  assert stats["positions"]["image_all"] == 3 * stats["positions"]["image_slice"]  # 9 frames vs frames 0, 4, 8
  assert all(k >= 0 for k in stats["image_slice"]["kl"]) and stats["image_slice"]["kl_sum"] > 0
  offsets = report["compatibility"]["group_offset_psnr"]
  assert sorted(offsets) == [1, 2, 3, 4] and all(3 < o["mean"] < 60 and o["n"] == 3 for o in offsets.values())
  md = (out / "metrics.md").read_text()
  assert "LPIPS v0.1 with the AlexNet backbone" in md and "## rFVD" in md and "| model |" in md
  assert "KL(CV ‖ image)" in md and "frame 4(i-1)+4" in md and "biased upwards" in md
  with Image.open(out / "compat_group.png") as im:
    assert im.size[0] > 100


def test_table1_protocols(golden, tmp_path):
  webvid = cli.parse_args(["--model=m", "--data=d", "--out=o", "--protocol=webvid"])
  assert (webvid.frames, webvid.stride, webvid.resolution, webvid.data_kind) == (33, 3, (256, 256), "video")
  explicit = cli.parse_args(["--model=m", "--data=d", "--out=o", "--protocol=webvid", "--frames=17"])
  assert explicit.frames == 17 and explicit.stride == 3
  coco = config.EvalConfig.for_protocol("coco", model=golden["cvvae_sd21_tiny"], baseline=golden["sd21_image_vae_tiny"],
                                        data="embedded:image", out=str(tmp_path / "out"), max_clips=2, batch_size=2,
                                        lpips=False, num_samples=0, progress=False)
  assert (coco.frames, coco.resolution, coco.data_kind, coco.protocol) == (1, (256, 256), "image", "coco")
  report = run.evaluate(coco)
  assert report["data"]["kind"] == "image" and report["data"]["num_clips"] == 2
  md = (tmp_path / "out" / "metrics.md").read_text()
  assert "| reference: the paper's CV-VAE 2D+3D (its coco data) | | | 27.60 | 0.805 |" in md
  assert "| reference: the paper's SD2.1 image VAE (its coco data) | | | 26.60 | 0.773 |" in md
  with pytest.raises(config.EvaluationError, match="protocol: expected one of"):
    config.EvalConfig(model="m", data="d", out="o", protocol="kinetics")


def test_images_are_one_frame_clips(golden, embedded_src, tmp_path):
  data = _two_real_and_one_broken(embedded_src, "image", tmp_path / "photos", "truncated.png",
                                  b"\x89PNG\r\n\x1a\n broken")
  out = tmp_path / "out"
  report = run.evaluate(config.EvalConfig(
      model=golden["sd21_image_vae_tiny"], data=str(data), out=str(out), resolution=(32, 48), batch_size=2,
      lpips=False, progress=False, num_samples=1))
  assert report["data"]["kind"] == "image" and report["data"]["frames"] == 1
  assert report["data"]["num_clips"] == 2 and report["data"]["num_skipped"] == 1
  assert report["metrics"] == ["psnr", "ssim"] and "lpips" not in report["results"]["recon/model"]
  assert len(report["results"]["recon/model"]["psnr"]["per_frame_mean"]) == 1
  assert report["compatibility"]["status"].startswith("off")
  assert (out / "samples" / "sample_00.png").exists() and not (out / "samples" / "sample_00.mp4").exists()
  assert json.loads((out / "metrics.json").read_text())["data"]["num_clips"] == 2
