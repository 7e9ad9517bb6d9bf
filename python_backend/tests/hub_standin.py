"""A stand-in for the two download servers ``anymc3d backbone get`` talks to, on 127.0.0.1.

* The Hugging Face hub's resolve endpoint, as huggingface_hub 2.5.0 reads it (``file_download.py``:
  ``get_hf_file_metadata`` takes ``X-Repo-Commit``, ``X-Linked-Etag`` / ``ETag`` and ``X-Linked-Size`` /
  ``Content-Length`` from a HEAD of ``/{repo}/resolve/{revision}/{file}``, then GETs it with ``Range`` to resume;
  ``utils/_http.py``: ``hf_raise_for_status`` turns a 401 with ``X-Error-Code: GatedRepo`` into ``GatedRepoError``
  and a 404 with ``X-Error-Code: RepoNotFound`` into ``RepositoryNotFoundError``). For LFS files the hub's etag is
  the content's SHA-256.
* A plain file server (dl.fbaipublicfiles.com) under ``/files/NAME``, honouring ``Range`` with 206 as it does.

Faults a test can switch on: ``truncate`` (the first GET of a file sends half its bytes, then closes the
connection), ``wrong_etag`` (the advertised SHA-256 is not the content's), ``gated`` (every hub request is 401
GatedRepo). Small text files (config.json) are served as the hub serves git files: their etag is the git
blob's SHA-1, not a SHA-256. Every request's method, path and Range header is logged in ``requests``.
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self):
        self.hub: dict[tuple[str, str], bytes] = {}  # (repo, filename) -> content
        self.files: dict[str, bytes] = {}  # plain files by name
        self.truncate, self.wrong_etag, self.gated = set(), False, False
        self.requests: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _content(self, path: str):
        if path.startswith("/files/"):
            return self.files.get(path[len("/files/"):]), False
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.hub.get(("/".join(parts[:2]), "/".join(parts[4:]))), True
        return None, False

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, body: bool):
                path = self.path.split("?")[0]
                stand_in.requests.append((self.command, path, self.headers.get("Range")))
                content, hub = stand_in._content(path)
                if hub and stand_in.gated:
                    self.send_response(401)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to model is restricted. You must have access to it.")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if content is None:
                    self.send_response(404)
                    if path.split("/")[3:4] == ["resolve"] or "/resolve/" in path:
                        self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                    if start >= len(content):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if start else 200)
                part = content[start:]
                self.send_header("Content-Length", str(len(part)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.send_header("Accept-Ranges", "bytes")
                if hub:  # LFS files: the SHA-256 of the content; small text files: the git blob's SHA-1
                    lfs = not path.endswith(".json")
                    served = content + b"x" if stand_in.wrong_etag else content
                    digest = (hashlib.sha256(served).hexdigest() if lfs else
                              hashlib.sha1(b"blob %d\0" % len(served) + served).hexdigest())
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{digest}"')
                    self.send_header("X-Linked-Etag", f'"{digest}"')
                    self.send_header("X-Linked-Size", str(len(content)))
                self.end_headers()
                if not body:
                    return
                if path in stand_in.truncate:
                    stand_in.truncate.discard(path)
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        return Handler
