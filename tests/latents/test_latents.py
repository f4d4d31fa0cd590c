"""Encoding the embedded clips in this process (`encode_dataset`) and reading them back (`latents.dataset`): what is
stored, what the loader yields, reruns, bad inputs. The killed-and-rerun and multi-process runs are in
test_encode_runs.py (slow)."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from cvvae_jax import inference, latents, load_pretrained
from cvvae_jax.data import embedded, media, sources
from cvvae_jax.data.stats import DataStats
from cvvae_jax.latents import clips, encode, records

CLIPS = 10  # the embedded training split's 5 videos x 2 clips
SHAPE = [3, 4, 6, 4]  # 9 frames -> 3 latents, 32x48 -> 4x6, 4 channels


def _encode(model, out, **overrides):
  settings = dict(model=model, data="embedded", split="train", out=str(out), frames=9, stride=2, resolution=(32, 48),
                  clips_per_video=2, batch_size=2, clips_per_shard=5, log_every_s=1e9)
  return encode.encode_dataset(encode.EncodeConfig(**{**settings, **overrides}))


@pytest.fixture(scope="module")
def encoded(tiny_model, tmp_path_factory):
  out = tmp_path_factory.mktemp("encoded")
  return out, _encode(tiny_model, out)


def test_latents_json_says_what_made_the_latents_and_every_clip_is_there(encoded, tiny_model):
  out, result = encoded
  info = records.read_info(out)
  assert info["model"]["class"] == "CVVAE" and info["model"]["variant"] == "sd21"
  assert info["model"]["path"] == os.path.abspath(tiny_model) and info["model"]["shift_factor"] == 0.0
  assert info["data"]["frames"] == 9 and info["data"]["clips_per_video"] == 2 and info["data"]["num_videos"] == 5
  assert info["latent"] == {**info["latent"], "shape": SHAPE, "dtype": "float32"}
  assert info["clips"] == {"num_clips": CLIPS, "clips_per_shard": 5, "num_shards": 2}
  assert "jax" in info["versions"] and info["encode"]["tiling"]["mode"] == "tiled"
  assert info["summary"] == {"complete": True, "num_stored": CLIPS, "num_skipped_clips": 0, "skipped": {}}
  assert result["run"]["clips"] == CLIPS
  data = latents.LatentDataset(out)
  assert data.clips.tolist() == list(range(CLIPS))  # in clip order, none twice, none missing


@pytest.mark.slow  # compiles the tiny model's encoder again (half a minute)
def test_every_clip_is_stored_once_with_its_posterior_and_source(encoded, tiny_model):
  out, _ = encoded
  model, params = load_pretrained(tiny_model)
  data = latents.LatentDataset(out)
  settings = clips.ClipSettings(9, 2, (32, 48), 2)
  source = clips.open_data(sources.describe_data("embedded", split="train"), DataStats())
  encode_posterior = jax.jit(functools.partial(inference.encode_posterior, model))
  for index in (0, 3, 9):
    meta = data.metadata(index)
    video_index, j = divmod(meta["clip"], 2)
    record = source[video_index]
    video, frames, fps = clips.load_clip(record, settings, j)
    assert meta["path"] == source.locate(record["key"]) and meta["path"].endswith(".mp4")
    assert meta["frames"] == frames.tolist() == (list(range(0, 17, 2)) if j == 0 else list(range(43, 60, 2)))
    assert meta["fps"] == pytest.approx(float(record["fps"]) / 2) and fps > 0
    posterior = encode_posterior(params, video[None].astype(np.float32) / 127.5 - 1.0)
    mean, logvar = data.posterior(index)
    np.testing.assert_allclose(mean, posterior.mean[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, posterior.logvar[0], rtol=1e-5, atol=1e-5)


def test_loader_batches_are_the_scaled_stored_posterior(encoded):
  out, _ = encoded
  data = latents.LatentDataset(out)
  scale, shift = np.float32(data.scaling_factor), np.float32(data.shift_factor)
  ds = latents.dataset(out, 5, seed=1, num_epochs=2)
  seen = []
  for batch in ds:
    assert batch["latents"].shape == (5, *SHAPE) and batch["latents"].dtype == np.float32
    for row, index in enumerate(batch["index"]):
      np.testing.assert_array_equal(batch["latents"][row], (data.posterior(index)[0] - shift) * scale)
      assert data.clips[index] == batch["clip"][row]
    seen.append(batch["clip"])
  assert ds.step == 4  # 2 epochs of 10 clips in batches of 5
  first, second = np.concatenate(seen[:2]), np.concatenate(seen[2:])
  assert sorted(first) == sorted(second) == list(range(CLIPS)) and not np.array_equal(first, second)

  # Samples: mean + std * eps, eps ~ N(0, 1), another one each epoch, the same for the same rng.
  eps, by_clip = [], {}
  for batch in latents.dataset(out, 4, seed=1, rng=7, num_epochs=2):
    for row, index in enumerate(batch["index"]):
      mean, logvar = data.posterior(index)
      z = latents.unscale(batch["latents"][row], data.info)
      eps.append((z - mean) / np.exp(0.5 * logvar))
      by_clip.setdefault(int(batch["clip"][row]), []).append(batch["latents"][row])
  eps = np.concatenate([e.ravel() for e in eps])
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1.0) < 0.05
  assert all(len(v) == 2 and not np.array_equal(*v) for v in by_clip.values())
  again = next(latents.dataset(out, 4, seed=1, rng=7))
  other = next(latents.dataset(out, 4, seed=1, rng=8))
  assert np.array_equal(again["latents"], next(latents.dataset(out, 4, seed=1, rng=7))["latents"])
  assert np.array_equal(again["clip"], other["clip"]) and not np.array_equal(again["latents"], other["latents"])
  key = next(latents.dataset(out, 4, seed=1, rng=jax.random.key(7)))
  assert key["latents"].shape == (4, *SHAPE)

  # From the in-memory copy: the same batches; with_logvar: the stored log-variance for sampling on the devices.
  cached = latents.dataset(out, 4, seed=1, rng=7, cache=True, with_logvar=True)
  for batch in latents.dataset(out, 4, seed=1, rng=7, num_epochs=1):
    other = next(cached)
    np.testing.assert_array_equal(other["latents"], batch["latents"])
    np.testing.assert_array_equal(other["logvar"], np.stack([data.posterior(i)[1] for i in batch["index"]]))


def test_loader_resumes_from_a_step_and_splits_over_hosts(encoded):
  out, _ = encoded
  full = latents.dataset(out, 4, seed=3, rng=5)
  batches = [next(full) for _ in range(7)]
  resumed = latents.dataset(out, 4, seed=3, rng=5, start_step=4)
  for step in range(4, 7):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["latents"], batches[step]["latents"])
  assert resumed.state() == {"step": 7}
  hosts = [latents.dataset(out, 4, seed=3, rng=5, process_index=p, process_count=2) for p in range(2)]
  for step in range(7):  # host p's rows are block p of the one-host batch (make_array_from_process_local_data)
    parts = [next(h) for h in hosts]
    assert parts[0]["latents"].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([p["latents"] for p in parts]), batches[step]["latents"])
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    latents.dataset(out, 3, process_index=0, process_count=2)


@pytest.mark.slow  # compiles the tiny model's decoder (half a minute)
def test_loader_latents_decode_back_with_inference_decode(encoded, tiny_model):
  out, _ = encoded
  model, params = load_pretrained(tiny_model)
  batch = next(latents.dataset(out, 2, shuffle=False))
  data = latents.LatentDataset(out)
  decode = jax.jit(functools.partial(inference.decode, model))
  video = decode(params, batch["latents"])
  assert video.shape == (2, 9, 32, 48, 3)
  means = np.stack([data.posterior(i)[0] for i in batch["index"]])
  np.testing.assert_array_equal(video, decode(params, model.scale_latent(means)))
  np.testing.assert_allclose(latents.unscale(batch["latents"], out), model.unscale_latent(batch["latents"]),
                             rtol=1e-6)


def test_a_rerun_resumes_and_other_settings_are_an_error(encoded, tiny_model, tmp_path):
  out, _ = encoded
  before = {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != records.INFO_NAME}
  assert _encode(tiny_model, out)["run"]["clips"] == 0  # every shard complete: nothing to do
  assert {name: (out / name).read_bytes() for name in before} == before
  with pytest.raises(ValueError, match=r"other settings(.|\n)*data\.frames: 9 there, 5 now"):
    _encode(tiny_model, out, frames=5)
  incomplete = tmp_path / "incomplete"
  shutil.copytree(out, incomplete)
  os.remove(records.manifest_path(str(incomplete), 1, 2))
  with pytest.raises(ValueError, match="1 of 2 shards are not complete.*rerun"):
    latents.dataset(incomplete, 4)


@pytest.mark.slow  # another encode job (ten seconds)
def test_bad_and_short_videos_are_skipped_and_listed(tiny_model, tmp_path):
  folder = tmp_path / "videos"
  folder.mkdir()
  src = embedded.split_folder(
      os.path.join(os.path.dirname(embedded.prepare_embedded_dataset("~/.cache/cvvae_jax/data")), "src"), "video")
  for name in ("bikes_0.mp4", "carphone_0.mp4"):
    shutil.copy(os.path.join(src, name), folder / name)
  (folder / "broken.mp4").write_bytes(b"not a video" * 100)
  media.write_video(str(folder / "short.mp4"), np.full((6, 32, 48, 3), 128, np.uint8), fps=10)
  out = tmp_path / "out"
  _encode(tiny_model, out, data=str(folder), clips_per_video=1)
  summary = records.read_info(out)["summary"]
  assert summary["num_stored"] == 2 and summary["num_skipped_clips"] == 1  # short.mp4 is a clip; broken.mp4 no video
  assert sorted(os.path.basename(p) for p in summary["skipped"]) == ["broken.mp4", "short.mp4"]
  assert "too short: 6 frames" in summary["skipped"][str(folder / "short.mp4")]
  paths = [latents.LatentDataset(out).metadata(i)["path"] for i in range(2)]
  assert paths == [str(folder / "bikes_0.mp4"), str(folder / "carphone_0.mp4")]


def test_a_dataset_of_the_old_one_record_format_says_to_encode_again(encoded, tmp_path):
  out, _ = encoded
  old = tmp_path / "old"
  old.mkdir()
  info = records.read_info(out)
  (old / records.INFO_NAME).write_text(json.dumps({**info, "format": "cvvae-latents/1"}))
  with pytest.raises(ValueError, match="cvvae-latents/2.*encode the dataset again"):
    latents.dataset(str(old), 4)


@pytest.mark.slow  # two compiles of the tiny encoder (45 s)
def test_a_folder_of_images_is_encoded_as_one_frame_clips(tiny_model, tmp_path):
  """Real photos (scikit-image), one of them corrupt: each good image is a one-frame clip whose stored posterior is
  the encoder's on the resized, centre-cropped image; the corrupt one is listed as skipped."""
  folder = tmp_path / "photos"
  folder.mkdir()
  for name in ("astronaut", "coffee", "chelsea"):
    Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  out = tmp_path / "latents"
  result = _encode(tiny_model, out, data=str(folder), frames=9, clips_per_shard=2)
  info = records.read_info(out)
  assert info["data"]["kind"] == "image" and info["data"]["frames"] == 1 and info["data"]["clips_per_video"] == 1
  assert info["latent"]["shape"] == [1, *SHAPE[1:]] and result["run"]["clips"] == 3
  assert info["summary"]["num_stored"] == 3 and list(info["summary"]["skipped"]) == [str(folder / "broken.jpg")]
  data = latents.LatentDataset(out)
  model, params = load_pretrained(tiny_model)
  settings = clips.ClipSettings(1, 1, (32, 48))
  for index in range(len(data)):
    meta = data.metadata(index)
    assert meta["frames"] == [0] and os.path.basename(meta["path"]) in ("astronaut.png", "chelsea.png", "coffee.png")
    frames, _, _ = clips.load_clip({"data": open(meta["path"], "rb").read()}, settings, 0, "image")
    assert frames.shape == (1, 32, 48, 3)
    posterior = inference.encode_posterior(model, params, frames[None].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(data.posterior(index)[0], posterior.mean[0], rtol=1e-5, atol=1e-5)
