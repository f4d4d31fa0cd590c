"""Tests of the input pipeline (cvvae_jax.data) on tiny synthetic videos and the embedded real data.

Synthetic videos carry their identity in the pixels: red = 10 * frame index, green = 40 * video id
(flat frames, so resizing and cropping keep the values), which lets the tests read back which frames
of which video each clip holds.
"""

import logging
import os
import socket
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cvvae_jax.data import config as data_config
from cvvae_jax import data
from cvvae_jax.data import media, mixing, pipeline, sources
from cvvae_jax.data.sampling import Kind

FRAMES = 24


def _write_video(path, video_id, num_frames=FRAMES, **kwargs):
  frames = np.zeros((num_frames, 32, 48, 3), np.uint8)
  frames[..., 0] = (10 * np.arange(num_frames))[:, None, None]
  frames[..., 1] = 40 * video_id
  media.write_video(str(path), frames, **{"fps": 25, "options": {}, **kwargs})


def _decode_ids(clip):
  """clip float [T, H, W, 3] in [-1, 1] -> (frame indices [T], video id)."""
  pixels = (np.asarray(clip) + 1.0) * 127.5
  frames = np.round(pixels[..., 0].mean(axis=(1, 2)) / 10).astype(int)
  video_ids = np.round(pixels[..., 1].mean(axis=(1, 2)) / 40).astype(int)
  assert np.all(video_ids == video_ids[0]), video_ids
  return frames, int(video_ids[0])


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  for v in range(6):
    _write_video(root / f"v{v}.mp4", v)
  return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(3):
    base = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # smooth content, upsampled
    Image.fromarray(base).resize((60, 40), Image.Resampling.BILINEAR).save(root / f"rgb{i}.png")
  Image.fromarray(np.full((40, 60), 128, np.uint8)).save(root / "gray.png")
  Image.fromarray(np.full((40, 60, 4), 128, np.uint8)).save(root / "alpha.png")
  return root


@pytest.fixture(scope="module")
def bad_video_dir(tmp_path_factory):
  """3 good videos, plus a corrupt, two truncated, an empty file and a wrong extension."""
  root = tmp_path_factory.mktemp("bad_videos")
  for v in range(3):
    _write_video(root / f"good{v}.mp4", v)
  _write_video(root / "full_a.mp4", 4)
  _write_video(root / "full_b.mp4", 5, faststart=True)
  a, b = (root / "full_a.mp4").read_bytes(), (root / "full_b.mp4").read_bytes()
  (root / "truncated_index_at_end.mp4").write_bytes(a[: len(a) // 2])
  (root / "truncated_index_in_front.mp4").write_bytes(b[: int(len(b) * 0.8)])
  os.remove(root / "full_a.mp4")
  os.remove(root / "full_b.mp4")
  (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  (root / "empty.mp4").write_bytes(b"")
  (root / "notes.txt").write_text("not a video")
  return root


def _config(*, video=None, image=None, mixing="alternate", **top):
  """A demo config whose streams read the given folders (None drops the stream)."""
  c = data_config.get_config("demo")
  for name, folder in (("video", video), ("image", image)):
    if folder is None:
      del c.streams[name]
    else:
      c.streams[name].source = "folder"
      c.streams[name].path = str(folder)
  if video is not None:
    c.streams.video.update(dict(frames=5, stride=(1, 8), size=(16, 16), short_side=(16, 24),
                                batch_size=2))
  if image is not None:
    c.streams.image.update(dict(size=(16, 16), short_side=(16, 20), batch_size=3))
  c.mixing = mixing
  c.num_parallel_calls = 2
  c.log_every_steps = 0
  c.update(top)
  return c


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


# --------------------------------------------------------------------------------------------------


def test_config_variants_and_unset_placeholders():
  full, demo = data_config.get_config("full"), data_config.get_config("demo")
  assert (full.streams.video.frames, full.streams.video.size, full.streams.video.short_side) == (
      17, (256, 256), (512, 512))
  assert full.streams.video.stride == (1, 8) and full.streams.image.size == (320, 320)
  assert full.streams.video.weight == full.streams.image.weight == 0.5
  assert (demo.streams.video.frames, demo.streams.video.size, demo.streams.video.batch_size,
          demo.streams.image.batch_size) == (9, (64, 64), 2, 4)
  assert (full.eval.frames, full.eval.stride, full.eval.size) == (33, 3, (256, 256))
  for c in (full, demo):
    assert isinstance(c.seed, int)
    assert [s.name for s in pipeline.parse_streams(c)] == ["image", "video"]
  with pytest.raises(ValueError, match="scale"):
    data_config.get_config("huge")
  with pytest.raises(ValueError, match=r"streams.image.path is unset"):
    data.create_train_iterator(full, seed=0, process_index=0, process_count=1)
  bad = data_config.get_config("demo")
  bad.streams.video.frames = 8
  with pytest.raises(ValueError, match=r"T = 1 \+ 4k.*got 8"):
    pipeline.parse_streams(bad)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.create_train_iterator(_config(video=tmp_path / "nope"), seed=0, process_index=0,
                               process_count=1)
  (tmp_path / "readme.txt").write_text("no videos here")
  with pytest.raises(ValueError, match="no usable video files"):
    data.create_train_iterator(_config(video=tmp_path), seed=0, process_index=0, process_count=1)


def test_video_batches_shapes_range_and_stride(video_dir):
  it = data.create_train_iterator(_config(video=video_dir), seed=0, process_index=0, process_count=1)
  assert it.batch_shapes == {"video": (2, 5, 16, 16, 3)}
  strides, starts = set(), set()
  for batch in _take(it, 12):
    video = batch["video"]
    assert batch["stream"] == "video"
    assert video.shape == (2, 5, 16, 16, 3) and video.dtype == np.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    for clip in video:
      frames, _ = _decode_ids(clip)
      steps = np.diff(frames)
      assert np.all(steps == steps[0]), frames  # one stride per clip
      # 24 frames hold a 5-frame clip at strides up to 5 (of the configured 1..8).
      assert 1 <= steps[0] <= 5 and frames[0] >= 0 and frames[-1] <= FRAMES - 1, frames
      strides.add(int(steps[0]))
      starts.add(int(frames[0]))
  assert len(strides) >= 3 and len(starts) >= 3, (strides, starts)
  assert it.stats.counters["stride_fallback"] == 0


def test_stride_fallback_and_too_short_video(tmp_path):
  _write_video(tmp_path / "long.mp4", 1)
  _write_video(tmp_path / "short.mp4", 2, num_frames=4)  # < 5 frames: unusable even at stride 1
  config = _config(video=tmp_path)
  config.streams.video.stride = (7, 8)  # 24 frames fit a 5-frame clip at stride <= 5 only
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  for batch in _take(it, 3):
    for clip in batch["video"]:
      frames, video_id = _decode_ids(clip)
      assert video_id == 1 and np.all(np.diff(frames) == 5), frames
  assert it.stats.counters["stride_fallback"] >= 6
  assert list(it.stats.skipped) == [str(tmp_path / "short.mp4")]
  assert "too short" in it.stats.skipped[str(tmp_path / "short.mp4")]


@pytest.mark.parametrize("mixing", ["alternate", "weighted"])
def test_deterministic_and_resumable(video_dir, image_dir, mixing):
  config = _config(video=video_dir, image=image_dir, mixing=mixing)

  def run(seed, start_step=0, n=8):
    it = data.create_train_iterator(config, seed=seed, process_index=0, process_count=1,
                                    start_step=start_step)
    return _take(it, n)

  first, again, other = run(0), run(0), run(1)
  config.num_parallel_calls = 1  # the order does not depend on the parallelism
  serial = run(0)
  streams = [b["stream"] for b in first]
  assert set(streams) == {"video", "image"}
  if mixing == "alternate":
    assert streams == ["image", "video"] * 4
  shapes = {b["stream"]: b["video"].shape for b in first}
  assert shapes == {"video": (2, 5, 16, 16, 3), "image": (3, 1, 16, 16, 3)}
  for a, b in zip(first * 2, again + serial):
    assert a["stream"] == b["stream"] and np.array_equal(a["video"], b["video"])
  assert any(a["stream"] != b["stream"] or not np.array_equal(a["video"], b["video"])
             for a, b in zip(first, other))
  resumed = run(0, start_step=5, n=3)
  for a, b in zip(first[5:], resumed):
    assert a["stream"] == b["stream"] and np.array_equal(a["video"], b["video"])


def test_hosts_read_disjoint_shards(video_dir):
  config = _config(video=video_dir)
  config.streams.video.batch_size = 2  # global: 1 per host

  def host_ids(p, steps):
    it = data.create_train_iterator(config, seed=3, process_index=p, process_count=2)
    assert it.batch_shapes["video"][0] == 1
    return [_decode_ids(b["video"][0])[1] for b in _take(it, steps)]

  h0, h1 = host_ids(0, 6), host_ids(1, 6)
  # One epoch (6 videos) is 3 steps: together the hosts read each video once, no overlap.
  assert sorted(h0[:3] + h1[:3]) == list(range(6))
  assert sorted(h0[3:] + h1[3:]) == list(range(6))
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.create_train_iterator(_config(video=video_dir), seed=0, process_index=0, process_count=4)


def test_bad_files_are_skipped_counted_and_reported_once(bad_video_dir, caplog):
  caplog.set_level(logging.WARNING)
  it = data.create_train_iterator(_config(video=bad_video_dir), seed=0, process_index=0,
                                  process_count=1)
  ids = {_decode_ids(clip)[1] for batch in _take(it, 6) for clip in batch["video"]}
  assert ids == {0, 1, 2}
  reasons = {os.path.basename(p): r for p, r in it.stats.skipped.items()}
  assert sorted(reasons) == ["corrupt.mp4", "empty.mp4", "notes.txt", "truncated_index_at_end.mp4",
                             "truncated_index_in_front.mp4"]
  assert "empty" in reasons["empty.mp4"]
  assert "unreadable" in reasons["corrupt.mp4"]
  assert "extension" in reasons["notes.txt"]
  assert "truncated" in reasons["truncated_index_in_front.mp4"]
  assert it.stats.num_skipped == 5
  for path in it.stats.skipped:
    assert sum(path in r.getMessage() for r in caplog.records) == 1, path


def test_file_broken_after_startup_is_replaced_and_reported_once(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  for v in range(3):
    _write_video(tmp_path / f"v{v}.mp4", v)
  stats = data.DataStats()
  config = _config(video=tmp_path)
  spec = pipeline.parse_streams(config)[0]
  source = sources.FolderSource(str(tmp_path), Kind.VIDEO, stats=stats)
  loader = pipeline.ExampleLoader(source, spec, seed=0, shuffle=True, process_index=0, process_count=1,
                                  stats=stats, max_attempts=4, decode_threads=1)
  (tmp_path / "v1.mp4").write_bytes(b"")  # breaks after the start-up probe
  ids = [_decode_ids(loader(slot) / 127.5 - 1.0)[1] for slot in range(9)]  # three epochs
  assert set(ids) == {0, 2}
  assert stats.skip_events == 3 and list(stats.skipped) == [str(tmp_path / "v1.mp4")]
  assert sum("v1.mp4" in r.getMessage() for r in caplog.records) == 1
  # Deterministic replacement: the same slots give the same clips again.
  again = [_decode_ids(loader(slot) / 127.5 - 1.0)[1] for slot in range(9)]
  assert again == ids


def test_images_center_crop_and_non_rgb_converted(image_dir):
  config = _config(image=image_dir)
  config.streams.image.update(dict(crop="center", short_side=(20, 20), batch_size=5))
  config.shuffle = False
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  (batch,) = _take(it, 1)
  assert batch["stream"] == "image" and batch["video"].shape == (5, 1, 16, 16, 3)
  assert not it.stats.skipped  # grayscale and RGBA are converted, not skipped
  pixels = np.round((batch["video"][:, 0] + 1.0) * 127.5)
  np.testing.assert_array_equal(pixels[0], 191)  # alpha.png: 128 at alpha 128 over white
  np.testing.assert_array_equal(pixels[1], 128)  # gray.png
  for i in range(3):  # 40x60 -> short side 20 -> 20x30 -> centre crop rows 2:18, cols 7:23
    resized = Image.open(image_dir / f"rgb{i}.png").resize((30, 20), Image.Resampling.BICUBIC)
    expected = np.asarray(resized, np.float32)[2:18, 7:23] / 127.5 - 1.0
    np.testing.assert_allclose(batch["video"][2 + i, 0], expected, atol=1e-6)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_copy_gives_the_same_batches_as_the_folder(bad_video_dir, image_dir, tmp_path,
                                                        file_format):
  for kind, folder in (("video", bad_video_dir), ("image", image_dir)):
    builder = data.prepare_folder(kind, str(folder), str(tmp_path / kind), file_format=file_format)
    assert builder.info.file_format.value == file_format
  folder_config = _config(video=bad_video_dir, image=image_dir, mixing="weighted")
  tfds_config = _config(video=bad_video_dir, image=image_dir, mixing="weighted")
  for kind in ("video", "image"):
    tfds_config.streams[kind].update(dict(source="tfds", tfds_name=f"cvvae_{kind}_folder",
                                          data_dir=str(tmp_path / kind)))
  kwargs = dict(seed=5, process_index=0, process_count=1, start_step=2)
  from_folder = data.create_train_iterator(folder_config, **kwargs)
  from_tfds = data.create_train_iterator(tfds_config, **kwargs)
  for a, b in zip(_take(from_folder, 6), _take(from_tfds, 6)):
    assert a["stream"] == b["stream"] and np.array_equal(a["video"], b["video"])
  # Files skipped when the dataset was prepared are reported by the TFDS iterator too.
  assert from_tfds.stats.num_skipped == from_folder.stats.num_skipped == 5  # the 5 bad videos (images all usable)
  assert all("prepared" in r for r in from_tfds.stats.skipped.values())


class TinyImageDataset(tfds.core.GeneratorBasedBuilder):
  """A standard TFDS image dataset (decoded `Image` feature, no key), as coco/2017 is."""
  name = "cvvae_test_tiny_images"
  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # see cvvae_jax.data.builders

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"image": np.full((20 + 4 * i, 24, 3), 40 * i, np.uint8), "label": i % 2}


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_standard_tfds_image_dataset_as_image_stream_and_eval(tmp_path, file_format):
  TinyImageDataset(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
  source = dict(source="tfds", tfds_name="cvvae_test_tiny_images", split="validation",
                data_dir=str(tmp_path), data_key="image")
  config = data_config.get_config("demo")
  del config.streams["video"]
  config.streams.image.update(dict(size=(16, 16), short_side=(16, 20), batch_size=5, **source))
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  (batch,) = _take(it, 1)
  values = np.round((batch["video"].mean(axis=(1, 2, 3, 4)) + 1) * 127.5).astype(int)
  assert sorted(values.tolist()) == [0, 40, 80, 120, 160]  # one epoch: each image once
  config.eval.update(dict(kind="image", frames=1, size=(16, 16), short_side=16, batch_size=2, **source))
  batches = list(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  assert batches[0]["path"].tolist() == ["tfds:cvvae_test_tiny_images/1.0.0:validation[0]",
                                         "tfds:cvvae_test_tiny_images/1.0.0:validation[1]"]
  videos = np.concatenate([b["video"] for b in batches])[:5]
  values = (videos + 1) * 127.5
  np.testing.assert_allclose(values, np.broadcast_to(values[:, :1, :1, :1], values.shape), atol=1e-4)
  assert sorted(np.round(values[:, 0, 0, 0, 0]).astype(int).tolist()) == [0, 40, 80, 120, 160]


def test_eval_iterator_center_clips_paths_and_padding(tmp_path):
  for v in range(3):
    _write_video(tmp_path / f"v{v}.mp4", v)
  _write_video(tmp_path / "v3_short.mp4", 3, num_frames=10)  # 5 frames at stride 3 need 13
  config = _config(video=tmp_path)
  config.eval.update(dict(source="folder", path=str(tmp_path), frames=5, stride=3, size=(16, 16),
                          short_side=16, batch_size=3))
  ev = data.create_eval_iterator(config, process_index=0, process_count=1)
  batches = list(ev)
  assert len(ev) == len(batches) == 2
  videos = np.concatenate([b["video"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  paths = np.concatenate([b["path"] for b in batches])
  assert videos.shape == (6, 5, 16, 16, 3) and videos.dtype == np.float32
  assert masks.tolist() == [True, True, True, False, False, False]
  assert [os.path.basename(p) for p in paths[:4]] == ["v0.mp4", "v1.mp4", "v2.mp4", "v3_short.mp4"]
  for v in range(3):
    frames, video_id = _decode_ids(videos[v])
    assert video_id == v and frames.tolist() == [0, 3, 6, 9, 12]
  assert np.all(videos[3:] == -1.0)
  assert "too short" in ev.stats.skipped[str(tmp_path / "v3_short.mp4")]
  # Two hosts: same number of batches each, disjoint examples.
  hosts = [data.create_eval_iterator(config, process_index=p, process_count=2) for p in (0, 1)]
  assert len(hosts[0]) == len(hosts[1]) == 1
  seen = [set(p for b in h for p, m in zip(b["path"], b["mask"]) if m) for h in hosts]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 3


def test_mixing_schedule():
  alternate = mixing.MixingSchedule([0.5, 0.5], mixing.Mixing.ALTERNATE, seed=0)
  it = alternate.iterate(0)
  assert [next(it) for _ in range(6)] == [0, 1, 0, 1, 0, 1]
  uneven = mixing.MixingSchedule([3.0, 1.0], mixing.Mixing.ALTERNATE, seed=0)
  assert uneven.counts_before(400).tolist() == [300, 100]
  weighted = mixing.MixingSchedule([0.2, 0.8], mixing.Mixing.WEIGHTED, seed=1)
  it = weighted.iterate(0)
  ids = np.array([next(it) for _ in range(10_000)])  # spans 3 random blocks
  assert weighted.counts_before(10_000).tolist() == np.bincount(ids, minlength=2).tolist()
  assert abs(ids.mean() - 0.8) < 0.02
  it = weighted.iterate(5000)
  assert [next(it) for _ in range(50)] == ids[5000:5050].tolist()


def test_embedded_dataset_builds_offline_with_real_content(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError("network access is not allowed in this test")
  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  start = time.perf_counter()
  tfds_dir = data.prepare_embedded_dataset(str(tmp_path))
  built_in = time.perf_counter() - start
  start = time.perf_counter()
  assert data.prepare_embedded_dataset(str(tmp_path)) == tfds_dir  # cached
  assert time.perf_counter() - start < min(1.0, built_in)
  monkeypatch.undo()

  config = data_config.get_config("demo")
  config.embedded_dir = str(tmp_path)
  config.log_every_steps = 0
  config.mixing = "alternate"  # 3 video and 3 image batches in 6 steps
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  batches = [next(it) for _ in range(6)]
  it.log()  # the periodic throughput line
  summary = it.stats.summary()
  assert summary["data/examples_per_s"] > 0 and summary["data/video/examples_per_s"] > 0
  assert it.state() == {"step": 6}
  it.close()
  assert it.stats.num_skipped == 0
  videos = np.concatenate([b["video"] for b in batches if b["stream"] == "video"])
  images = np.concatenate([b["video"] for b in batches if b["stream"] == "image"])
  assert videos.shape == (6, 9, 64, 64, 3) and images.shape == (12, 1, 64, 64, 3)
  # Real content: textured frames, colour, and motion between frames (not constant frames).
  assert videos.std(axis=(2, 3)).mean() > 0.1 and images.std(axis=(2, 3)).mean() > 0.1
  assert np.abs(np.diff(videos, axis=1)).mean(axis=(2, 3, 4)).min() > 0.003
  assert np.abs(videos[..., 0] - videos[..., 2]).mean() > 0.02
  # The demo's probe reads the 9 held-out clips (the last segment of each source), in order, each once.
  ev = data.create_eval_iterator(config, process_index=0, process_count=1)
  batches = list(ev)
  assert batches[0]["video"].shape == (3, 9, 64, 64, 3) and batches[0]["mask"].all()
  held_out = [os.path.basename(p.split(":")[-1]) for b in batches for p, m in zip(b["path"], b["mask"]) if m]
  assert held_out == [f"{name}_{j}.mp4" for name in ("bigbuckbunny_1", "bikes_3", "carphone_1") for j in range(3)]
  # The demo training configs' image stream: single frames of the training clips.
  config.streams = ml_collections.ConfigDict({"frames": data_config.demo_frames_stream()})
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  frames = np.concatenate([next(it)["video"] for _ in range(2)])
  it.close()
  assert frames.shape == (8, 1, 64, 64, 3) and frames.std(axis=(2, 3)).mean() > 0.1
