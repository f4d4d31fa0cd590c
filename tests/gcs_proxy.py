"""An HTTP proxy on localhost in front of the test GCS server (tests/gcs_server.py) that can fail: an outage.

    proxy = FaultyProxy(server.url); proxy.start()     # proxy.url: point STORAGE_EMULATOR_HOST (gcsfs) and
    proxy.fail_for(1.0)                                # TENSORSTORE_GCS_HTTP_URL (TensorStore) at it
    ...                                                # every request in the next second: 503 Service Unavailable
    proxy.fail_for(None)                               # from now on, every request: 503 (a persistent outage)
    proxy.stop()

Outside an outage each request is forwarded to the server as it came (method, path, headers, body) and the answer
sent back; `proxy.failed` counts the requests answered 503 (`proxy.failed_agents`: by client, the first word of
their User-Agent), `proxy.forwarded` the others.
"""
from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
import urllib.parse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length"}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` as TensorStore's curl sends it

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        chunk = self.rfile.read(size)
        self.rfile.readline()  # the CRLF after each chunk
        if size == 0:
          return b"".join(chunks)
        chunks.append(chunk)
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _handle(self) -> None:
    proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
    body = self._body()
    agent = self.headers.get("User-Agent", "").split("/")[0].split()[0] if self.headers.get("User-Agent") else ""
    if proxy.failing(agent):
      proxy.failed += 1
      proxy.failed_agents[agent] = proxy.failed_agents.get(agent, 0) + 1
      payload = json.dumps({"error": {"code": 503, "message": "Service Unavailable (test outage)"}}).encode()
      self.send_response(503)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)
      return
    proxy.forwarded += 1
    proxy.forwarded_agents[agent] = proxy.forwarded_agents.get(agent, 0) + 1
    conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
    try:
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect", "host"}}
      headers["Host"] = proxy.upstream.netloc
      conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH") else None,
                   headers=headers)
      resp = conn.getresponse()
      data = resp.read()
      self.send_response(resp.status, resp.reason)
      for k, v in resp.getheaders():
        if k.lower() not in _HOP_BY_HOP:
          self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
    finally:
      conn.close()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

  def log_message(self, *args) -> None:  # quiet
    pass


class FaultyProxy:
  """A proxy to `upstream_url` (http://host:port) on a free localhost port; see the module docstring."""

  def __init__(self, upstream_url: str):
    self.upstream = urllib.parse.urlsplit(upstream_url)
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self._server.daemon_threads = True
    self._server.proxy = self  # type: ignore[attr-defined]
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._until: float | None = 0.0  # monotonic time the outage ends; None: never
    self._thread: threading.Thread | None = None
    self.failed = self.forwarded = 0
    self.failed_agents: dict[str, int] = {}  # requests answered 503, by the first word of their User-Agent
    self.forwarded_agents: dict[str, int] = {}
    self._only: str | None = None

  def fail_for(self, seconds: float | None, only: str | None = None) -> None:
    """Answers every request with 503 for `seconds` from now (None: until the next `fail_for`); `only`: only the
    requests of that client (the first word of their User-Agent, e.g. "python-gcsfs")."""
    self._until, self._only = (None if seconds is None else time.monotonic() + seconds), only

  def failing(self, agent: str = "") -> bool:
    return (self._only is None or agent == self._only) and (self._until is None or time.monotonic() < self._until)

  def start(self) -> None:
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
