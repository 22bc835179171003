"""A local stand-in of the Hugging Face Hub's HTTP file API, on 127.0.0.1, for download tests.

``LocalHub({"org/tiny": checkpoint_dir})`` serves ``HEAD``/``GET
/<repo>/resolve/<revision>/<file>`` the way huggingface_hub's own client reads them
(``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``X-Error-Code: EntryNotFound`` /
``RepoNotFound`` / ``GatedRepo``), and records every request in ``requests`` as
``(method, repo, revision, file)``. A repo listed in ``gated`` answers 401 GatedRepo unless
the request carries ``Authorization: Bearer <token>``. Point the client at it with
``HF_ENDPOINT=hub.url`` (a process) or ``endpoint=hub.url``.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class LocalHub:
    def __init__(self, repos: dict[str, Path], *, gated: dict[str, str] | None = None) -> None:
        self.repos = {name: Path(path) for name, path in repos.items()}
        self.gated = dict(gated or {})
        self.requests: list[tuple[str, str, str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = unquote(self.path.split("?", 1)[0])
                repo, sep, rest = path.lstrip("/").partition("/resolve/")
                revision, _, filename = rest.partition("/")
                if not sep or not filename:
                    return self._error(404, "EntryNotFound")
                hub.requests.append((self.command, repo, revision, filename))
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound")
                token = hub.gated.get(repo)
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    return self._error(401, "GatedRepo")
                file = hub.repos[repo] / filename
                if not file.is_file():
                    return self._error(404, "EntryNotFound")
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="local-hub")

    def files(self, method: str = "GET") -> list[str]:
        """The files downloaded (``GET``) or asked about (``HEAD``), in order."""
        return [f for m, _, _, f in self.requests if m == method]

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
