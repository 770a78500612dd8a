"""A real HTTP receiver on 127.0.0.1 for notification tests (http.server in a thread).

Answers are scripted per path (a queue of (status, body) pairs, then the
default). With ``ding_secret`` set, requests must carry a valid DingTalk
``timestamp``/``sign``; a bad signature gets DingTalk's own answer: HTTP 200
with a non-zero ``errcode``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    path: str
    query: dict[str, list[str]]
    body: Any
    sign_ok: bool | None


class Receiver:
    def __init__(self, ding_secret: str | None = None) -> None:
        self.ding_secret = ding_secret
        self.requests: list[Request] = []
        self._script: dict[str, deque[tuple[int, str]]] = {}
        self.default: tuple[int, str] = (200, "ok")
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                status, text = receiver._answer(parts.path, query)
                sign_ok = (
                    receiver._check_sign(query)
                    if receiver.ding_secret and parts.path.startswith("/robot")
                    else None
                )
                if sign_ok is False:
                    status, text = 200, json.dumps({"errcode": 310000, "errmsg": "sign not match"})
                with receiver._lock:
                    receiver.requests.append(Request(parts.path, query, json.loads(raw), sign_ok))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str = "/hook", query: str = "") -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")

    def script(self, path: str, answers: list[tuple[int, str]]) -> None:
        with self._lock:
            self._script.setdefault(path, deque()).extend(answers)

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, str]:
        with self._lock:
            queue = self._script.get(path)
            if queue:
                return queue.popleft()
        return self.default

    def _check_sign(self, query: dict[str, list[str]]) -> bool:
        assert self.ding_secret is not None
        try:
            ts, sign = query["timestamp"][0], query["sign"][0]
        except KeyError:
            return False
        digest = hmac.new(
            self.ding_secret.encode(), f"{ts}\n{self.ding_secret}".encode(), hashlib.sha256
        ).digest()
        return hmac.compare_digest(base64.b64encode(digest).decode(), sign)

    def got(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]
