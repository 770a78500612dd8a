"""One POST to a receiver, and what its answer means.

Failures that may pass (HTTP 5xx, 408, 429, a timeout, a refused
connection, a DingTalk ``errcode``, a Slack body other than ``ok``
with a 5xx) are retried by the deliverer; a 4xx is final (a wrong URL or
token does not heal). Reasons never contain the URL or the secret.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from orchestrator.notify.payload import render
from orchestrator.notifyconfig import Kind

__all__ = ["Answer", "post"]

#: A receiver that takes longer than this is treated as down (retried).
TIMEOUT_S = 10.0
_ANSWER_CHARS = 300


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of one POST: ok, or why not and whether retrying may help."""

    ok: bool
    retry: bool = False
    status: int | None = None
    text: str = ""
    reason: str | None = None


def post(
    kind: Kind,
    url: str,
    body: Mapping[str, Any],
    *,
    secret: str | None,
    now_ms: int,
    timeout_s: float = TIMEOUT_S,
) -> Answer:
    """POST ``body`` rendered for ``kind``; never raises for a network or HTTP failure."""
    target, payload = render(kind, url, body, secret=secret, now_ms=now_ms)
    request = urllib.request.Request(
        target,
        data=orjson.dumps(payload),
        headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "orch-notify"},
        method="POST",
    )
    hide = tuple(s for s in (url, target, secret) if s)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = response.status
            text = response.read(64 * 1024).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        text = _read(exc)
        retry = exc.code >= 500 or exc.code in (408, 429)
        return Answer(False, retry, exc.code, _clip(text, hide), f"HTTP {exc.code}")
    except TimeoutError:
        return Answer(False, True, None, "", f"no answer within {timeout_s:g}s")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Answer(False, True, None, "", _clip(f"cannot connect: {reason}", hide))
    return _judge(kind, status, _clip(text, hide))


def _judge(kind: Kind, status: int, text: str) -> Answer:
    if kind is Kind.SLACK:
        if text.strip() == "ok" or _json_field(text, "ok") is True:
            return Answer(True, status=status, text=text)
        return Answer(False, False, status, text, f"slack answered {text.strip()[:80]!r}")
    if kind is Kind.DINGTALK:
        errcode = _json_field(text, "errcode")
        if errcode == 0 and not isinstance(errcode, bool):
            return Answer(True, status=status, text=text)
        msg = _json_field(text, "errmsg")
        return Answer(False, True, status, text, f"dingtalk errcode {errcode}: {msg}")
    return Answer(True, status=status, text=text)


def _json_field(text: str, key: str, default: Any = None) -> Any:
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return default
    return doc.get(key, default) if isinstance(doc, dict) else default


def _read(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return ""


def _clip(text: str, hide: tuple[str, ...]) -> str:
    for secret in hide:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= _ANSWER_CHARS else text[: _ANSWER_CHARS - 3] + "..."
