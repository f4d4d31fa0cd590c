"""A video folder on gs:// (the local fake-gcs-server of tests/conftest.py): indexed and read through the same code as
a local one; the index is kept in the bucket and reused."""

from etils import epath

from cvvae_jax import data, paths
from cvvae_jax.data import config as data_config
from cvvae_jax.data import index
from cvvae_jax.data.sampling import Kind
from tests.data.test_media_scale import _encode, _real_frames


def test_gs_folder_indexed_reused_and_read_like_a_local_one(gcs_server, tmp_path):
  frames = _real_frames(30, (48, 64))
  files = {"a.mp4": _encode(frames), "sub/b.mp4": _encode(frames[:20], pts0=300), "bad.mp4": b"not a video",
           "notes.txt": b"text"}
  bucket = gcs_server.bucket("videos") + "/clips"
  local = tmp_path / "clips"
  for rel, blob in files.items():
    epath.Path(f"{bucket}/{rel}").write_bytes(blob)
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    (local / rel).write_bytes(blob)
  remote = index.build_index(bucket, Kind.VIDEO, workers=1)
  here = index.build_index(str(local), Kind.VIDEO, workers=1)
  def meta(built):
    return [{k: (v.split(":")[0] if k == "error" else v) for k, v in e.items() if k != "mtime_ns"}
            for e in built.entries]
  assert meta(remote) == meta(here) and remote.others == here.others == ["notes.txt"]
  assert remote.path == f"{bucket}/.cvvae_index/video.jsonl"
  assert "clips/.cvvae_index/video.jsonl" in gcs_server.objects("videos")
  assert index.build_index(bucket, Kind.VIDEO, workers=1).counts["probed"] == 0
  epath.Path(f"{bucket}/sub/b.mp4").write_bytes(files["a.mp4"])  # changed: a new generation, probed again
  gcs_server.upload("videos", "clips/c.mp4", files["sub/b.mp4"])  # added by another writer
  paths.refresh(bucket)
  updated = index.build_index(bucket, Kind.VIDEO, workers=1)
  assert updated.counts == {"listed": 4, "reused": 2, "probed": 2}
  assert {e["path"]: e.get("num_frames") for e in updated.entries} == {"a.mp4": 30, "bad.mp4": None,
                                                                       "c.mp4": 20, "sub/b.mp4": 30}
  config = data_config.get_config("demo")
  del config.streams["image"]
  config.streams.video.update({"source": "folder", "path": bucket, "frames": 5, "stride": (2, 2), "size": (32, 32),
                               "short_side": (32, 32), "batch_size": 2})
  config.log_every_steps = 0
  it = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  batch = next(it)
  it.close()
  assert batch["video"].shape == (2, 5, 32, 32, 3)
  assert sorted(it.stats.skipped) == [f"{bucket}/bad.mp4", f"{bucket}/notes.txt"]
