"""The wire protocol between a shard and its master, shared by both sides.

Two channels carry the same facts:

* ZeroMQ: the SDK's DEALER socket sends one frame per message, an orjson map
  with short keys; the master's ROUTER answers checkpoints and the final
  summary with ACK or NACK. ``encode``/``decode`` are the only conversions.
* stdout: a shard in any language prints ``##orch {json}`` lines, which the
  master recognises while it writes the logs; ``parse_line`` decodes them.

This module imports nothing from ``orchestrator``: the master imports it, and
an SDK must stay importable without the master. docs/protocol.md is the
normative description; keep the two in step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

PROTOCOL_VERSION = 1
#: Largest frame (and stdout protocol line) either side accepts, in bytes.
MAX_FRAME_BYTES = 1 << 20
#: Largest integer either side accepts (64-bit signed, what SQLite and most languages hold):
#: a larger count from a buggy or forged sender is a protocol error, never an overflow.
MAX_INT = 2**63 - 1
#: Prefix of a stdout protocol line; the rest of the line is one JSON object.
STDOUT_PREFIX = b"##orch "
#: Progress heartbeats are sent at most this often (seconds), so a shard sends
#: at most ~1/PROGRESS_MIN_INTERVAL_S + 1/heartbeat-interval messages a second.
PROGRESS_MIN_INTERVAL_S = 0.2

# Environment the master gives each attempt.
ENV_RUN_ID = "ORCH_RUN_ID"
ENV_SHARD_ID = "ORCH_SHARD_ID"
ENV_SHARD_INDEX = "ORCH_SHARD_INDEX"
ENV_SHARD_COUNT = "ORCH_SHARD_COUNT"
ENV_ATTEMPT = "ORCH_ATTEMPT"
ENV_SHARD = "ORCH_SHARD"
ENV_ENDPOINT = "ORCH_ENDPOINT"
ENV_HEARTBEAT_INTERVAL = "ORCH_HEARTBEAT_INTERVAL"
ENV_CHECKPOINT = "ORCH_CHECKPOINT"
ENV_CHECKPOINT_DONE = "ORCH_CHECKPOINT_DONE"
ENV_MASTER_PID = "ORCH_MASTER_PID"
#: Over TCP (the ray backend): the master's CURVE public key and the run's client pair.
ENV_CURVE_SERVER = "ORCH_CURVE_SERVER"
ENV_CURVE_PUBLIC = "ORCH_CURVE_PUBLIC"
ENV_CURVE_SECRET = "ORCH_CURVE_SECRET"
#: The node an attempt runs on (the ray backend; the Ray node id).
ENV_NODE = "ORCH_NODE"
#: Set by the SDK itself (never by the master) to the pid of the process that
#: holds the attempt's connection, so processes it spawns do not connect too.
ENV_SDK_PID = "ORCH_SDK_PID"


class ProtocolError(Exception):
    """Raised when bytes on the wire or a stdout protocol line cannot be decoded."""


class Kind(enum.StrEnum):
    """What a message is; the value is the wire spelling of key ``k``."""

    HEARTBEAT = "hb"  # shard -> master: liveness, carries done/total/rss
    CHECKPOINT = "cp"  # shard -> master: carries "cp"; needs an ACK
    END = "end"  # shard -> master: final summary at exit; needs an ACK
    ACK = "ack"  # master -> shard: echoes the seq it acknowledges
    NACK = "nack"  # master -> shard: refusal with a reason in "msg"


class Message(NamedTuple):
    """One message on the ZeroMQ channel, in either direction.

    ``has_checkpoint`` tells "checkpoint is JSON null" from "no checkpoint";
    on the wire it is the presence of key ``cp``. A NamedTuple rather than a
    frozen dataclass: just as immutable, and built several times faster,
    which the master's ingest of 100,000 messages a second needs.
    """

    kind: Kind
    run: str
    shard: str
    attempt: int
    seq: int = 0
    done: int | None = None
    total: int | None = None
    rss: int | None = None
    checkpoint: Any = None
    has_checkpoint: bool = False
    message: str | None = None
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class StdoutReport:
    """One decoded ``##orch`` stdout line; every field is optional."""

    done: int | None
    advance: int | None
    total: int | None
    checkpoint: Any
    has_checkpoint: bool
    message: str | None


_KINDS = {k.value: k for k in Kind}
_STDOUT_KEYS = frozenset({"done", "advance", "total", "checkpoint", "message"})


def encode(msg: Message) -> bytes:
    """Serialise ``msg`` to one frame. Optional fields that are None are omitted.

    ``cp`` is written when ``has_checkpoint`` is set or ``checkpoint`` is not
    None. Field values are not validated here (``decode`` is the gatekeeper);
    a value orjson cannot serialise raises ``TypeError``, and a frame over
    MAX_FRAME_BYTES raises ProtocolError because no receiver would accept it.
    """
    d: dict[str, Any] = {
        "v": msg.v,
        "k": msg.kind.value,
        "run": msg.run,
        "sh": msg.shard,
        "a": msg.attempt,
        "seq": msg.seq,
    }
    if msg.done is not None:
        d["done"] = msg.done
    if msg.total is not None:
        d["total"] = msg.total
    if msg.rss is not None:
        d["rss"] = msg.rss
    if msg.has_checkpoint or msg.checkpoint is not None:
        d["cp"] = msg.checkpoint
    if msg.message is not None:
        d["msg"] = msg.message
    frame = orjson.dumps(d)
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame too large: {len(frame)} bytes > {MAX_FRAME_BYTES}")
    return frame


def wire_count(value: Any) -> int | None:
    """Coerce a counter for the wire (a caller may have advanced by a float)."""
    if value is None:
        return None
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _count(d: dict[str, Any], key: str) -> int | None:
    """Return d[key] when it is an int (not bool) in 0..MAX_INT, None when absent or null."""
    value = d.get(key)
    if value is None or (type(value) is int and 0 <= value <= MAX_INT):
        return value
    if type(value) is int:
        raise ProtocolError(f"negative {key!r}" if value < 0 else f"{key!r} past 2**63-1")
    raise ProtocolError(f"{key!r} must be a non-negative integer, not {type(value).__name__}")


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{what} too large: {len(data)} bytes > {MAX_FRAME_BYTES}")
    try:
        d = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        raise ProtocolError(f"{what} is not JSON") from None
    if type(d) is not dict:
        raise ProtocolError(f"{what} is not a JSON object")
    return d


def decode(frame: bytes) -> Message:
    """Parse and validate one frame; any defect raises ProtocolError with a short reason.

    Unknown keys are ignored (additive changes keep the version); ``null`` for
    an optional field means absent, except ``cp`` where null is a checkpoint.
    """
    d = _load_object(frame, "frame")
    v = d.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        shown = v if type(v) is int else type(v).__name__
        raise ProtocolError(f"unknown version {shown}")
    k = d.get("k")
    kind = _KINDS.get(k) if type(k) is str else None
    if kind is None:
        raise ProtocolError("unknown kind")
    run = d.get("run")
    if type(run) is not str or not run:
        raise ProtocolError("missing or invalid 'run'")
    shard = d.get("sh")
    if type(shard) is not str or not shard:
        raise ProtocolError("missing or invalid 'sh'")
    attempt = d.get("a")
    if type(attempt) is not int or not 1 <= attempt <= MAX_INT:
        raise ProtocolError("missing or invalid 'a'")
    seq = d.get("seq")
    if seq is None:
        seq = 0
    elif type(seq) is not int or not 0 <= seq <= MAX_INT:
        raise ProtocolError("'seq' must be a non-negative integer")
    done = _count(d, "done")
    total = _count(d, "total")
    rss = _count(d, "rss")
    text = d.get("msg")
    if text is not None and type(text) is not str:
        raise ProtocolError("'msg' must be a string")
    has_cp = "cp" in d
    if not has_cp and kind is Kind.CHECKPOINT:
        raise ProtocolError("checkpoint message without 'cp'")
    return Message(kind, run, shard, attempt, seq, done, total, rss, d.get("cp"), has_cp, text, v)


def heartbeat_fields(
    frame: bytes, run_id: str
) -> tuple[str, int, int | None, int | None, int | None] | None:
    """The fast path: a heartbeat of run ``run_id`` as (shard, attempt, done, total, rss).

    None for anything else — another kind, another run, or any defect — which
    ``decode`` then handles (and a caller counts). Whatever this accepts,
    ``decode`` accepts with the same values, so the two paths count alike.
    """
    if len(frame) > MAX_FRAME_BYTES:
        return None
    try:
        d = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if type(d) is not dict or d.get("k") != "hb" or d.get("run") != run_id:
        return None
    v = d.get("v")
    shard = d.get("sh")
    attempt = d.get("a")
    if (
        type(v) is not int
        or v != PROTOCOL_VERSION
        or type(shard) is not str
        or not shard
        or type(attempt) is not int
        or not 1 <= attempt <= MAX_INT
    ):
        return None
    done = d.get("done")
    total = d.get("total")
    rss = d.get("rss")
    seq = d.get("seq")
    text = d.get("msg")
    if (
        (done is not None and (type(done) is not int or not 0 <= done <= MAX_INT))
        or (total is not None and (type(total) is not int or not 0 <= total <= MAX_INT))
        or (rss is not None and (type(rss) is not int or not 0 <= rss <= MAX_INT))
        or (seq is not None and (type(seq) is not int or not 0 <= seq <= MAX_INT))
        or (text is not None and type(text) is not str)
    ):
        return None
    return shard, attempt, done, total, rss


def parse_line(line: bytes) -> StdoutReport | None:
    """Decode one stdout line: None when it is not a protocol line (no prefix).

    A prefixed line must hold one JSON object with only the keys ``done``,
    ``advance``, ``total`` (non-negative integers), ``checkpoint`` (any JSON)
    and ``message`` (string); ``done`` and ``advance`` exclude each other.
    A trailing "\\n" or "\\r\\n" is ignored. Anything else raises ProtocolError.
    """
    if not line.startswith(STDOUT_PREFIX):
        return None
    d = _load_object(line[len(STDOUT_PREFIX) :].rstrip(b"\r\n"), "protocol line")
    if not d.keys() <= _STDOUT_KEYS:
        unknown = min(d.keys() - _STDOUT_KEYS)
        raise ProtocolError(f"unknown key {unknown[:40]!r}")
    done = _count(d, "done")
    advance = _count(d, "advance")
    if done is not None and advance is not None:
        raise ProtocolError("'done' and 'advance' exclude each other")
    text = d.get("message")
    if text is not None and type(text) is not str:
        raise ProtocolError("'message' must be a string")
    return StdoutReport(
        done=done,
        advance=advance,
        total=_count(d, "total"),
        checkpoint=d.get("checkpoint"),
        has_checkpoint="checkpoint" in d,
        message=text,
    )
