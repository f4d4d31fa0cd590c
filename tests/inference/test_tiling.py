"""Chunking and tiling geometry (cvvae_jax/tiling.py) with local coders, where any correct split is exact.

The synthetic coders below have CV-VAE's shapes and causal semantics but no norms, so a tiled result equals the untiled
one exactly iff chunks, tiles, kept frames, blend windows and crops are all right. Real-model numerics are in
test_inference.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cvvae_jax.inference import plan as plan_lib
from cvvae_jax.inference import tiling
from cvvae_jax.inference.plan import Geometry, Mode, Span, TilingConfig
from tests.helpers import random_params


@pytest.fixture(autouse=True, scope="module")
def _highest_matmul_precision():
  """Exact fp32 matmuls for this module's comparisons, without changing the setting for other test modules."""
  with jax.default_matmul_precision("highest"):
    yield


@dataclasses.dataclass(frozen=True)
class PoolEncoder:
  """[B, 1+4m, H, W, C] -> [B, 1+m, H/8, W/8, C]: latent 0 pools frame 0, latent j the mean of frames 4j-3..4j;
  spatially an 8x8 average. Counts its traces."""
  traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

  def __call__(self, params, x):
    self.traces.append(x.shape)
    b, t, h, w, c = x.shape
    first = x[:, :1]
    rest = x[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, c).mean(2)
    y = jnp.concatenate([first, rest], axis=1)
    return y.reshape(b, y.shape[1], h // 8, 8, w // 8, 8, c).mean((3, 5)) * params["scale"]


@dataclasses.dataclass(frozen=True)
class RepeatDecoder:
  """[B, 1+m, h, w, C] -> [B, 1+4m, 8h, 8w, C]: frame 0 from latent 0, frames 4j-3+n (n = 0..3) are latent j + n,
  so the first frame of a later chunk (an image slot) differs from the frame the untiled pass makes there."""

  def __call__(self, params, z):
    b, t, h, w, c = z.shape
    up = jnp.repeat(jnp.repeat(z, 8, axis=2), 8, axis=3)
    rest = up[:, 1:, None] + jnp.arange(4.0)[None, None, :, None, None, None]
    rest = rest.reshape(b, 4 * (t - 1), 8 * h, 8 * w, c)
    return jnp.concatenate([up[:, :1], rest], axis=1) * params["scale"]


@dataclasses.dataclass(frozen=True)
class FrameDecoder:
  """Image mode: every latent frame to an image, 8x nearest upsampling."""

  def __call__(self, params, z):
    return jnp.repeat(jnp.repeat(z, 8, axis=2), 8, axis=3) * params["scale"]


PARAMS = {"scale": jnp.float32(1.5)}


def _video(t, h, w, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, t, h, w, 3)).astype(np.float32)


CONFIGS = [
    TilingConfig(encode_chunk_frames=9, decode_chunk_latents=3, tile_size=64, overlap=0.25),
    TilingConfig(encode_chunk_frames=5, decode_chunk_latents=2, tile_size=32, overlap=0.25),
    TilingConfig(mode="original", encode_chunk_frames=9, decode_chunk_latents=3, tile_size=64, overlap=0.25),
    TilingConfig(mode="original", encode_chunk_frames=17, decode_chunk_latents=5, tile_size=32, overlap=0.25),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode.value}-{c.encode_chunk_frames}-{c.tile_size}")
@pytest.mark.parametrize("streaming", [False, True])
def test_local_encoder_split_is_exact(config, streaming):
  x = _video(29, 120, 168)  # 8 latent frames, 15 x 21 latents: last chunk and last tiles do not fit evenly
  fn, geo = PoolEncoder(), Geometry.video_encoder()
  plan = plan_lib.make_plan(config, geo, x.shape)
  assert len(plan.time) > 1 and plan.space.num_tiles > 1
  want = fn(PARAMS, jnp.asarray(x))
  run = tiling.apply_streaming if streaming else jax.jit(tiling.apply, static_argnums=(0, 3, 4))
  got = run(fn, PARAMS, x, plan, geo)
  assert got.shape == want.shape == (2, 8, 15, 21, 3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode.value}-{c.decode_chunk_latents}-{c.tile_size}")
@pytest.mark.parametrize("streaming", [False, True])
def test_local_decoder_split_is_exact(config, streaming):
  z = _video(10, 15, 21, seed=1)
  fn, geo = RepeatDecoder(), Geometry.video_decoder()
  plan = plan_lib.make_plan(config, geo, z.shape)
  assert len(plan.time) > 1 and plan.space.num_tiles > 1
  want = fn(PARAMS, jnp.asarray(z))
  run = tiling.apply_streaming if streaming else jax.jit(tiling.apply, static_argnums=(0, 3, 4))
  got = run(fn, PARAMS, z, plan, geo)
  assert got.shape == want.shape == (2, 37, 120, 168, 3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_dropping_the_wrong_frame_is_detected():
  """Sanity of the test coder: keeping each later chunk's first (image-slot) frame changes the result."""
  z = _video(9, 4, 4)
  fn = RepeatDecoder()
  whole = np.asarray(fn(PARAMS, jnp.asarray(z)))
  second = np.asarray(fn(PARAMS, jnp.asarray(z[:, 4:9])))
  assert np.abs(second[:, 0] - whole[:, 16]).max() > 1.0
  np.testing.assert_allclose(second[:, 1:], whole[:, 17:], atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "tiled", "original"])
def test_image_mode_frame_groups_are_exact(mode):
  z = _video(11, 9, 13, seed=2)  # 11 frames in groups of 4 (the last group moved back)
  fn, geo = FrameDecoder(), Geometry.image_decoder()
  config = TilingConfig(mode=mode, frame_chunk=4, tile_size=40, overlap=0.2)
  plan = plan_lib.make_plan(config, geo, z.shape)
  assert [s.size for s in plan.time] == [4, 4, 4]
  got = tiling.apply_streaming(fn, PARAMS, z, plan, geo)
  np.testing.assert_allclose(got, np.asarray(fn(PARAMS, jnp.asarray(z))), atol=2e-6)


def test_one_chunk_and_tile_is_the_plain_call():
  x = _video(17, 64, 48)
  fn, geo = PoolEncoder(), Geometry.video_encoder()
  for mode in Mode:
    plan = plan_lib.make_plan(TilingConfig(mode=mode), geo, x.shape)
    assert plan.time == (Span(0, 5),) and plan.space.num_tiles == 1
    np.testing.assert_array_equal(np.asarray(tiling.apply(fn, PARAMS, jnp.asarray(x), plan, geo)),
                                  np.asarray(fn(PARAMS, jnp.asarray(x))))


def test_original_boundaries():
  """The original's numbers (cvvae_notes.md): 17-frame rounds every 16 frames, 576-px tiles every 448 px (latent
  72 every 56), 5-latent rounds every 4 latents; the last round/tile is cut off at the border."""
  cfg = TilingConfig(mode="original")
  enc = plan_lib.make_plan(cfg, Geometry.video_encoder(), (1, 33, 720, 1280, 3))
  assert enc.time == (Span(0, 5), Span(4, 5))
  assert enc.space.rows == (Span(0, 72), Span(56, 34))
  assert enc.space.cols == (Span(0, 72), Span(56, 72), Span(112, 48))
  assert enc.space.stride == 56
  enc = plan_lib.make_plan(cfg, Geometry.video_encoder(), (1, 41, 576, 584, 3))  # 11 latents: rounds 0-4, 4-8, 8-10
  assert enc.time == (Span(0, 5), Span(4, 5), Span(8, 3))
  assert enc.space.rows == (Span(0, 72),) and enc.space.cols == (Span(0, 72), Span(56, 17))
  dec = plan_lib.make_plan(cfg, Geometry.video_decoder(), (1, 25, 32, 32, 4))  # 97 frames
  assert dec.time == tuple(Span(4 * n, 5) for n in range(6)) and dec.space.num_tiles == 1
  assert plan_lib.original_tile_numbers(576, 0.2222, 8, True) == (72, 56)
  assert plan_lib.original_tile_numbers(576, 0.2222, 8, False) == (72, 56)
  with pytest.raises(ValueError, match="would not line up"):
    plan_lib.original_tile_numbers(576, 0.3, 8, True)


def test_tiled_boundaries():
  cfg = TilingConfig()
  enc = plan_lib.make_plan(cfg, Geometry.video_encoder(), (1, 41, 720, 1280, 3))
  assert enc.time == (Span(0, 5), Span(4, 5), Span(6, 5))  # last chunk moved back: equal shapes
  assert enc.space.rows == (Span(0, 72), Span(18, 72))
  assert enc.space.cols == (Span(0, 72), Span(56, 72), Span(88, 72))
  img = plan_lib.make_plan(cfg, Geometry.image_decoder(), (1, 20, 32, 32, 4))
  assert img.time == (Span(0, 8), Span(8, 8), Span(12, 8))


def test_original_blend_order():
  """Constant tiles a (top-left), b (top-right), c (bottom-left), d (bottom-right): the original blends d's corner
  with the already blended b and c, so corner weights are not the product of the edge weights."""
  o, s = 4, 6
  vals = [[1.0, 10.0], [100.0, 1000.0]]
  grid = [[np.full((1, 1, s + o, s + o, 1), v, np.float32) for v in row] for row in vals]
  out = tiling.blend_original(grid, o, s, np)[0, 0, :, :, 0]
  assert out.shape == (2 * s + o, 2 * s + o)
  w = np.arange(o) / o
  a_, b_, c_, d_ = 1.0, 10.0, 100.0, 1000.0
  # Edges: plain cross-fades.
  np.testing.assert_allclose(out[0, s:s + o], (1 - w) * a_ + w * b_, rtol=1e-6)
  np.testing.assert_allclose(out[s:s + o, 0], (1 - w) * a_ + w * c_, rtol=1e-6)
  # Corner (rows i, cols j of d's overlap): b blended with a on its left, c blended with a on its top, then d.
  wi, wj = w[:, None], w[None, :]
  b_blended = (1 - wj) * a_ + wj * b_  # b's bottom-left rows, left-blended with a
  c_blended = (1 - wi) * a_ + wi * c_  # c's top-right, top-blended with a
  d_top = (1 - wi) * b_blended + wi * d_
  want = (1 - wj) * c_blended + wj * d_top
  np.testing.assert_allclose(out[s:s + o, s:s + o], want, rtol=1e-6)
  separable = ((1 - wi) * (1 - wj) * a_ + (1 - wi) * wj * b_ + wi * (1 - wj) * c_ + wi * wj * d_)
  assert np.abs(want - separable).max() > 1.0
  np.testing.assert_allclose(out[s + o:, s + o:], d_)


def test_blend_windows_sum_to_one():
  for spans in [plan_lib.even_spans(100, 30, 7), plan_lib.even_spans(61, 30, 7), plan_lib.even_spans(40, 39, 7)]:
    w = plan_lib.blend_windows(spans, 8)
    total = np.zeros(spans[-1].end * 8)
    for s, wi in zip(spans, w):
      total[s.start * 8:s.end * 8] += wi
      assert wi.min() > 0
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


def test_no_recompiles_across_chunks_and_lengths():
  compiles = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    _check_no_recompiles(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _check_no_recompiles(compiles):
  fn, geo = PoolEncoder(), Geometry.video_encoder()
  cfg = TilingConfig(encode_chunk_frames=9, tile_size=32)
  x = _video(1 + 4 * 7, 48, 40, seed=3)  # 8 latents: 4 chunks of 3, the last moved back
  plan = plan_lib.make_plan(cfg, geo, x.shape)
  assert len(plan.time) == 4 and plan.space.num_tiles == 4
  tiling.apply_streaming(fn, PARAMS, x, plan, geo)
  first, traces = len(compiles), len(fn.traces)
  assert first >= 1 and traces <= 2  # traced once for the output shape, once for the scan body
  y = _video(1 + 4 * 12, 48, 40, seed=4)  # another length: 6 chunks, same chunk shape
  plan = plan_lib.make_plan(cfg, geo, y.shape)
  got = tiling.apply_streaming(fn, PARAMS, y, plan, geo)
  assert len(compiles) == first, "recompiled for a new video length"
  assert len(fn.traces) == traces
  np.testing.assert_allclose(got, np.asarray(fn(PARAMS, jnp.asarray(y))), atol=2e-6)


def test_batch_sharded_over_a_mesh():
  """The pure tiled encode/decode (scans over chunks and tiles) under jit with the batch sharded over 8 devices."""
  import cvvae_jax
  from cvvae_jax import inference
  vae = cvvae_jax.CVVAE(variant="sd21", block_out_channels=(32, 32, 32, 32), latent_channels=4)
  params = random_params(vae)
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets them up")
  mesh = Mesh(devices, ("data",))
  x = jax.random.uniform(jax.random.PRNGKey(6), (8, 9, 32, 24, 3), minval=-1, maxval=1)
  cfg = TilingConfig(encode_chunk_frames=5, decode_chunk_latents=2, tile_size=16, overlap=0.25)
  batch = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def roundtrip(params, x):
    z = inference.encode(vae, params, x, tiling=cfg)
    return z, inference.decode(vae, params, z, tiling=cfg)

  sharded = jax.jit(roundtrip, in_shardings=(replicated, batch), out_shardings=(batch, batch))
  z, out = sharded(jax.device_put(params, replicated), jax.device_put(x, batch))
  assert out.sharding.is_equivalent_to(batch, out.ndim)
  # The same per-device batch unsharded (a batch of 8 on one device blocks its convolutions differently, and the
  # random tiny model amplifies rounding differences).
  single = jax.jit(roundtrip)
  for i in (0, 7):
    z_ref, out_ref = single(params, x[i:i + 1])
    np.testing.assert_allclose(z[i:i + 1], z_ref, atol=1e-5)
    np.testing.assert_allclose(out[i:i + 1], out_ref, atol=1e-5)


def test_errors_name_what_was_expected():
  geo = Geometry.video_encoder()
  with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
    plan_lib.make_plan(TilingConfig(), geo, (1, 16, 64, 64, 3))
  with pytest.raises(ValueError, match="multiples of 8"):
    plan_lib.make_plan(TilingConfig(), geo, (1, 17, 60, 64, 3))
  with pytest.raises(ValueError, match="1 \\+ 4m"):
    plan_lib.make_plan(TilingConfig(encode_chunk_frames=8), geo, (1, 17, 64, 64, 3))
  with pytest.raises(ValueError, match="unknown tiling mode"):
    TilingConfig(mode="fast")


def test_streaming_reports_progress_per_chunk():
  import io

  fn, geo = PoolEncoder(), Geometry.video_encoder()
  x = _video(1 + 4 * 7, 16, 16, seed=5)
  plan = plan_lib.make_plan(TilingConfig(encode_chunk_frames=9), geo, x.shape)
  calls = []
  tiling.apply_streaming(fn, PARAMS, x, plan, geo, progress=lambda done, total: calls.append((done, total)))
  assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
  out = io.StringIO()
  report = tiling.chunk_progress("encode", stream=out)
  report(1, 4)
  report(4, 4)
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("encode: chunk 1/4, ") and "s per chunk, ETA" in lines[0]
  assert lines[1].endswith("ETA 0 s")
