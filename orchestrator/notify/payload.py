"""What is posted: the facts of one notification, and each kind's body and URL.

The master records *facts* (a JSON object) in the outbox when something
happens; the deliverer renders them for the channel's kind at send time, so
a DingTalk signature carries the timestamp of the send, not of the event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator.notifyconfig import Kind
from orchestrator.units import format_duration

__all__ = ["FailedShard", "RunFacts", "dingtalk_sign", "facts_body", "render"]

#: How much of a failed shard's stderr tail a message carries (characters).
STDERR_TAIL_CHARS = 500
#: At most this many failed shards are listed in one message.
MAX_FAILED_LISTED = 20


@dataclass(frozen=True, slots=True)
class FailedShard:
    """A shard that gave up: its id, last reason and the tail of its stderr."""

    id: str
    reason: str | None = None
    stderr_tail: str | None = None


@dataclass(frozen=True, slots=True)
class RunFacts:
    """The run as a notification describes it; the master (or ``store_facts``) provides it."""

    run: str
    name: str
    state: str
    items_done: int = 0
    items_total: int | None = None
    rate: float | None = None
    eta_s: float | None = None
    failed: Sequence[FailedShard] = field(default_factory=tuple)
    counts: Mapping[str, int] = field(default_factory=dict)


def facts_body(
    event: str, facts: RunFacts, *, at: float, shard: FailedShard | None = None
) -> dict[str, Any]:
    """The stored facts of one notification (the webhook body, less its id)."""
    failed = [
        {"id": f.id, "reason": f.reason, "stderr_tail": _tail(f.stderr_tail)}
        for f in list(facts.failed)[:MAX_FAILED_LISTED]
    ]
    body: dict[str, Any] = {
        "event": event,
        "run": facts.run,
        "name": facts.name,
        "state": facts.state,
        "items_done": facts.items_done,
        "items_total": facts.items_total,
        "rate": facts.rate,
        "eta_s": facts.eta_s,
        "failed": failed,
        "failed_count": len(facts.failed),
        "counts": dict(facts.counts),
        "at": at,
    }
    if shard is not None:
        body["shard"] = {
            "id": shard.id,
            "reason": shard.reason,
            "stderr_tail": _tail(shard.stderr_tail),
        }
    body["text"] = _text(body)
    return body


def _tail(text: str | None) -> str | None:
    if text is None:
        return None
    return text[-STDERR_TAIL_CHARS:]


_HEADLINES = {
    "done": "run {name} ({run}) is done",
    "failed": "run {name} ({run}) failed",
    "stopped": "run {name} ({run}) was stopped",
    "gave_up": "run {name} ({run}): shard {shard} gave up",
    "hung": "run {name} ({run}): shard {shard} is hung (no heartbeat), replacing it",
    "stalled": "run {name} ({run}): shard {shard} is stalled (no progress), replacing it",
    "digest": "run {name} ({run}) is {state}",
    "test": "orch test message (run {run})",
}


def _text(body: Mapping[str, Any]) -> str:
    shard = body.get("shard") or {}
    line = _HEADLINES.get(body["event"], "run {name} ({run}): {event}").format(
        name=body["name"],
        run=body["run"],
        state=body["state"],
        shard=shard.get("id"),
        event=body["event"],
    )
    parts = [line]
    if shard.get("reason"):
        parts.append(f"reason: {shard['reason']}")
    if body["event"] != "test":
        total = body["items_total"]
        progress = f"items: {body['items_done']}" + (f"/{total}" if total is not None else "")
        if body.get("rate"):
            progress += f", {body['rate']:.1f}/s"
        if body.get("eta_s") is not None and body["state"] == "running":
            progress += f", eta {format_duration(round(body['eta_s']))}"
        parts.append(progress)
        if body["failed_count"]:
            ids = ", ".join(f["id"] for f in body["failed"])
            more = body["failed_count"] - len(body["failed"])
            parts.append(
                f"failed: {body['failed_count']} ({ids}{f', +{more} more' if more else ''})"
            )
    return "\n".join(parts)


def render(
    kind: Kind, url: str, body: Mapping[str, Any], *, secret: str | None, now_ms: int
) -> tuple[str, dict[str, Any]]:
    """The URL to POST to and the JSON body, for a channel of ``kind``."""
    if kind is Kind.SLACK:
        return url, {"text": body["text"]}
    if kind is Kind.DINGTALK:
        title = body["text"].split("\n", 1)[0]
        markdown = "\n\n".join(
            [f"#### {title}", *(f"- {line}" for line in body["text"].split("\n")[1:])]
        )
        payload = {"msgtype": "markdown", "markdown": {"title": title, "text": markdown}}
        if secret:
            url = _with_query(url, timestamp=str(now_ms), sign=dingtalk_sign(secret, now_ms))
        return url, payload
    return url, dict(body)


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """``base64(HMAC-SHA256(secret, f"{timestamp_ms}\\n{secret}"))`` (not yet URL-encoded)."""
    digest = hmac.new(
        secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))
