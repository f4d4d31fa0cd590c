"""Test-wide setup: 8 fake CPU devices for mesh tests (must be set before JAX starts)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Identical programs compiled in several tests (e.g. train steps of resumed runs) hit this on-disk cache.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cvvae_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest

from tests import gcs_server as gcs_server_lib  # noqa: E402

# Before any test module imports gcsfs (which reads its emulator settings at import): see tests/gcs_server.py.
GCS_PORT = gcs_server_lib.configure_clients()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A fake-gcs-server on localhost for the whole session, with gcsfs, etils.epath, Orbax and TensorStore pointed at
  it (tests/gcs_server.py); `gcs_server.bucket(name)` -> "gs://name"."""
  server = gcs_server_lib.GcsServer(str(tmp_path_factory.mktemp("gcs_server")), port=GCS_PORT)
  server.start()
  try:
    yield server
  finally:
    server.stop()
