"""A Hugging Face Hub API server on localhost, serving model repos from folders, for `huggingface_hub` clients.

    with HubServer({"owner/name": {"main": folder}}) as hub:          # folder: the files of that revision
      os.environ["HF_ENDPOINT"] = hub.endpoint                        # (before huggingface_hub is imported)

It answers the calls `huggingface_hub.snapshot_download` and `hf_hub_download` make, in the Hub's own formats:
  GET  /api/models/OWNER/NAME/revision/REV                 repo info (`sha`, `siblings`)
  GET  /api/models/OWNER/NAME/tree/REV[/PATH]?recursive=   the file tree (one page)
  HEAD|GET /OWNER/NAME/resolve/REV/PATH                    a file, with `X-Repo-Commit`, `ETag`, `Content-Length`
and the Hub's errors: 404 with `X-Error-Code` RepoNotFound, RevisionNotFound or EntryNotFound (which the client
turns into `RepositoryNotFoundError`, `RevisionNotFoundError`, `EntryNotFoundError`), and 401 GatedRepo for repos
listed in `gated`. A revision is a branch name or its commit hash (the sha1 of the branch name and the file list,
so it changes when the files do). Every request is recorded in `requests` ("METHOD path").
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import urllib.parse


def _tree(folder: str) -> list[str]:
  out = []
  for root, _, files in os.walk(folder):
    out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in files]
  return sorted(out)


def _oid(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


class HubServer:
  """Serves `repos` ({repo_id: {branch: folder}}) at `endpoint` until `close` (or the `with` block ends)."""

  def __init__(self, repos: dict[str, dict[str, str]], gated: tuple[str, ...] = ()):
    self.repos = {repo: {branch: os.fspath(folder) for branch, folder in branches.items()}
                  for repo, branches in repos.items()}
    self.gated = set(gated)
    self.requests: list[str] = []
    self._commits = {}
    for repo, branches in self.repos.items():
      for branch, folder in branches.items():
        sha = hashlib.sha1(json.dumps([repo, branch, _tree(folder)]).encode()).hexdigest()
        self._commits[(repo, branch)] = self._commits[(repo, sha)] = (sha, folder)
    handler = type("Handler", (_Handler,), {"hub": self})
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def __enter__(self) -> "HubServer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def commit(self, repo: str, revision: str) -> str:
    return self._commits[(repo, revision)][0]

  def lookup(self, repo: str, revision: str) -> tuple[int, str, tuple[str, str] | None]:
    """(status, error code, (sha, folder)) for a repo and revision."""
    if repo not in self.repos:
      return 404, "RepoNotFound", None
    if repo in self.gated:
      return 401, "GatedRepo", None
    found = self._commits.get((repo, revision))
    return (200, "", found) if found else (404, "RevisionNotFound", None)


class _Handler(http.server.BaseHTTPRequestHandler):
  hub: HubServer
  protocol_version = "HTTP/1.1"

  def log_message(self, *args) -> None:  # quiet: the test reads `hub.requests`
    pass

  def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *,
            content_type: str = "application/json") -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _error(self, status: int, code: str, message: str) -> None:
    self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message})

  def _route(self) -> None:
    self.hub.requests.append(f"{self.command} {self.path}")
    url = urllib.parse.urlsplit(self.path)
    parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
    if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
      repo, kind, revision, rest = "/".join(parts[2:4]), parts[4], parts[5], "/".join(parts[6:])
      status, code, found = self.hub.lookup(repo, revision)
      if found is None:
        return self._error(status, code, f"{code}: {repo}@{revision}")
      sha, folder = found
      files = _tree(folder)
      if kind == "revision":
        info = {"id": repo, "modelId": repo, "sha": sha, "private": False, "gated": False, "disabled": False,
                "siblings": [{"rfilename": f} for f in files], "tags": [], "downloads": 0, "likes": 0}
        return self._send(200, json.dumps(info).encode())
      prefix = f"{rest.strip('/')}/" if rest else ""
      recursive = urllib.parse.parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
      entries, dirs = [], set()
      for f in files:
        if not f.startswith(prefix):
          continue
        tail = f[len(prefix):]
        if "/" in tail and not recursive:
          dirs.add(prefix + tail.split("/", 1)[0])
          continue
        for i in range(tail.count("/")):
          dirs.add(prefix + "/".join(tail.split("/")[:i + 1]))
        entries.append({"type": "file", "oid": _oid(os.path.join(folder, f)),
                        "size": os.path.getsize(os.path.join(folder, f)), "path": f})
      entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                  for d in sorted(dirs)]
      return self._send(200, json.dumps(entries).encode())
    if len(parts) >= 5 and parts[2] == "resolve":
      repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
      status, code, found = self.hub.lookup(repo, revision)
      if found is None:
        return self._error(status, code, f"{code}: {repo}@{revision}")
      sha, folder = found
      path = os.path.join(folder, *name.split("/"))
      if not os.path.isfile(path):
        return self._error(404, "EntryNotFound", f"{name} not in {repo}@{revision}")
      with open(path, "rb") as f:
        data = f.read()
      return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_oid(path)}"'},
                        content_type="application/octet-stream")
    return self._error(404, "NotFound", f"no route for {url.path}")

  do_GET = do_HEAD = _route
