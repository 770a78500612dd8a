"""The door of ``orch serve``: Host check, token, read-only, same-origin mutations.

A pure ASGI middleware (no response buffering, so server-sent events stream
through untouched). In order:

1. ``Host`` must name the served host (DNS rebinding: a page on
   ``evil.example`` that re-resolves to 127.0.0.1 still sends its own name),
   else 403. A server bound to a wildcard address accepts any name; it always
   requires the token.
2. ``GET /healthz`` is open. Everything else needs the token: ``Authorization:
   Bearer TOKEN``, the ``orch_token`` cookie, or ``?token=TOKEN`` once, which
   sets that cookie (HttpOnly, SameSite=Strict) and, on a page, redirects to
   the same URL without the token so it does not stay in the address bar or
   the history. A missing or wrong token is 401 with a JSON error.
3. Mutations are POST only (routes accept nothing else); a POST whose
   ``Origin`` is another site is 403, and ``--read-only`` refuses every POST
   with 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "orch_token"
#: Paths that are pages (a ``?token=`` there redirects to the clean URL).
PAGE_PREFIXES = ("/runs/",)


async def _json(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps({"error": error})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        hosts: frozenset[str] | None,
        read_only: bool,
    ) -> None:
        self.app = app
        self.token = token
        self.hosts = hosts  # None: any Host (wildcard bind)
        self.read_only = read_only

    def _ok_token(self, given: str | None) -> bool:
        if self.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.hosts is not None and host not in self.hosts:
            await _json(send, 403, f"unexpected Host header {host!r}", [])
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        if path == "/healthz" and method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        via_query = next((v for k, v in query if k == "token"), None)
        extra: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            bearer = None
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth[:7].lower() == "bearer ":
                bearer = auth[7:].strip()
            cookie = None
            if b"cookie" in headers:
                jar: SimpleCookie = SimpleCookie()
                try:
                    jar.load(headers[b"cookie"].decode("latin-1"))
                except Exception:  # noqa: BLE001 - a garbled cookie is no cookie
                    jar = SimpleCookie()
                if COOKIE in jar:
                    cookie = jar[COOKIE].value
            if not (self._ok_token(bearer) or self._ok_token(cookie)):
                if not self._ok_token(via_query):
                    await _json(
                        send,
                        401,
                        "a token is required: 'Authorization: Bearer TOKEN', or open the URL "
                        "orch serve printed",
                        [(b"www-authenticate", b'Bearer realm="orch"')],
                    )
                    return
                set_cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()
                extra.append((b"set-cookie", set_cookie))
                if method == "GET" and (path == "/" or path.startswith(PAGE_PREFIXES)):
                    rest = urlencode([(k, v) for k, v in query if k != "token"])
                    location = path + (f"?{rest}" if rest else "")
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 303,
                            "headers": [
                                (b"location", location.encode()),
                                (b"content-length", b"0"),
                                (b"cache-control", b"no-store"),
                                *extra,
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": b""})
                    return
        if method not in ("GET", "HEAD"):
            origin = headers.get(b"origin")
            if origin is not None:
                netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
                if netloc != host:
                    await _json(send, 403, "cross-origin requests may not change anything", [])
                    return
            if self.read_only:
                await _json(send, 403, "orch serve runs --read-only: nothing can be changed", [])
                return

        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
