"""The wire protocol: strict decoding, round trips, and the stdout line format."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    STDOUT_PREFIX,
    Kind,
    Message,
    ProtocolError,
    StdoutReport,
    decode,
    encode,
    parse_line,
)

DROP = object()  # marks a key to remove
HB = {"v": 1, "k": "hb", "run": "r1", "sh": "s1", "a": 1, "seq": 4, "done": 10, "total": 20}

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
counts = st.none() | st.integers(0, 2**63 - 1)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(Kind))
    has_cp = kind is Kind.CHECKPOINT or draw(st.booleans())
    return Message(
        kind=kind,
        run=draw(st.text(min_size=1)),
        shard=draw(st.text(min_size=1)),
        attempt=draw(st.integers(1, 2**31)),
        seq=draw(st.integers(0, 2**63 - 1)),
        done=draw(counts),
        total=draw(counts),
        rss=draw(counts),
        checkpoint=draw(json_values) if has_cp else None,
        has_checkpoint=has_cp,
        message=draw(st.none() | st.text()),
    )


WIRE_KEYS = ["v", "k", "run", "sh", "a", "seq", "done", "total", "rss", "cp", "msg", "x"]


@st.composite
def wire_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message's map with a few keys replaced by any JSON or removed: near misses."""
    d = orjson.loads(encode(draw(messages())))
    odd_values = json_scalars | st.sampled_from(["hb", "cp", "end", "ack", "nack"])
    for key in draw(st.lists(st.sampled_from(WIRE_KEYS), max_size=3)):
        if draw(st.booleans()):
            d[key] = draw(odd_values)
        else:
            d.pop(key, None)
    return d


stdout_maps = st.dictionaries(
    st.sampled_from(["done", "advance", "total", "checkpoint", "message", "other"]),
    json_values,
)


# -- wire ---------------------------------------------------------------------------


@given(messages())
def test_encode_decode_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_optional_fields_are_omitted_and_keys_are_short() -> None:
    msg = Message(Kind.HEARTBEAT, "r1", "s1", 2, seq=3, done=5, rss=7)
    assert orjson.loads(encode(msg)) == {
        "v": 1,
        "k": "hb",
        "run": "r1",
        "sh": "s1",
        "a": 2,
        "seq": 3,
        "done": 5,
        "rss": 7,
    }


def test_a_null_checkpoint_is_distinct_from_no_checkpoint() -> None:
    with_null = decode(encode(Message(Kind.END, "r", "s", 1, has_checkpoint=True)))
    without = decode(encode(Message(Kind.END, "r", "s", 1)))
    assert (with_null.has_checkpoint, without.has_checkpoint) == (True, False)
    assert b'"cp":null' in encode(with_null)


def test_decode_accepts_a_minimal_message_and_ignores_unknown_keys() -> None:
    frame = b'{"v":1,"k":"ack","run":"r","sh":"s","a":1,"future":[1,2]}'
    assert decode(frame) == Message(Kind.ACK, "r", "s", 1)


def test_null_optional_fields_read_as_absent() -> None:
    nulls = b'{"v":1,"k":"hb","run":"r","sh":"s","a":1,"seq":null,"done":null,"msg":null}'
    assert decode(nulls) == Message(Kind.HEARTBEAT, "r", "s", 1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "unknown version 2"),
        ({"v": True}, "unknown version bool"),
        ({"v": DROP}, "unknown version NoneType"),
        ({"k": "hello"}, "unknown kind"),
        ({"k": 1}, "unknown kind"),
        ({"run": DROP}, "missing or invalid 'run'"),
        ({"run": ""}, "missing or invalid 'run'"),
        ({"sh": 5}, "missing or invalid 'sh'"),
        ({"a": DROP}, "missing or invalid 'a'"),
        ({"a": 0}, "missing or invalid 'a'"),
        ({"a": True}, "missing or invalid 'a'"),
        ({"seq": -1}, "'seq' must be a non-negative integer"),
        ({"done": -1}, "negative 'done'"),
        ({"done": True}, "'done' must be a non-negative integer, not bool"),
        ({"total": 1.5}, "'total' must be a non-negative integer, not float"),
        ({"rss": "1"}, "'rss' must be a non-negative integer, not str"),
        (
            {"rss": orjson.Fragment(b"18446744073709551616")},
            "'rss' must be a non-negative integer, not float",
        ),
        ({"msg": 3}, "'msg' must be a string"),
        ({"k": "cp"}, "checkpoint message without 'cp'"),
    ],
)
def test_decode_rejects_with_a_short_reason(change: dict[str, Any], reason: str) -> None:
    d = {k: v for k, v in {**HB, **change}.items() if v is not DROP}
    with pytest.raises(ProtocolError) as err:
        decode(orjson.dumps(d))
    assert str(err.value) == reason


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "frame is not JSON"),
        (b"\xff\xfe", "frame is not JSON"),
        (b"[1,2]", "frame is not a JSON object"),
        (b"1e400", "frame is not JSON"),
        (b" " * (MAX_FRAME_BYTES + 1), f"frame too large: {MAX_FRAME_BYTES + 1} bytes"),
    ],
)
def test_decode_rejects_malformed_frames(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(frame)
    assert str(err.value).startswith(reason)


def test_encode_refuses_a_frame_no_receiver_would_accept() -> None:
    big = Message(Kind.CHECKPOINT, "r", "s", 1, checkpoint="x" * MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="frame too large"):
        encode(big)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_decode_of_arbitrary_bytes_raises_only_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert msg.v == PROTOCOL_VERSION


@settings(max_examples=1000)
@given(wire_maps())
def test_decode_of_near_miss_maps_raises_only_protocol_error(d: dict[str, Any]) -> None:
    try:
        msg = decode(orjson.dumps(d))
    except ProtocolError:
        return
    # Whatever got through is fully valid and survives a round trip.
    assert type(msg.attempt) is int and msg.attempt >= 1 and msg.run and msg.shard
    assert all(c is None or (type(c) is int and c >= 0) for c in (msg.done, msg.total, msg.rss))
    assert decode(encode(msg)) == msg


# -- stdout ---------------------------------------------------------------------------


def test_lines_without_the_prefix_are_not_protocol_lines() -> None:
    assert parse_line(b"progress 50%\n") is None
    assert parse_line(b"##orch{}\n") is None
    assert parse_line(b"") is None


@pytest.mark.parametrize("end", [b"", b"\n", b"\r\n"])
def test_parse_line_reads_every_field(end: bytes) -> None:
    line = STDOUT_PREFIX + b'{"done": 5, "total": 9, "checkpoint": {"p": 2}, "message": "hi"}'
    assert parse_line(line + end) == StdoutReport(5, None, 9, {"p": 2}, True, "hi")


def test_parse_line_empty_object_is_a_bare_heartbeat() -> None:
    assert parse_line(b"##orch {}\n") == StdoutReport(None, None, None, None, False, None)
    assert parse_line(b'##orch {"checkpoint": null}').has_checkpoint  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "protocol line is not JSON"),
        (b"done=5", "protocol line is not JSON"),
        (b"[5]", "protocol line is not a JSON object"),
        (b'{"done": 1, "extra": 2}', "unknown key 'extra'"),
        (b'{"done": -1}', "negative 'done'"),
        (b'{"advance": true}', "'advance' must be a non-negative integer, not bool"),
        (b'{"total": "9"}', "'total' must be a non-negative integer, not str"),
        (b'{"message": 1}', "'message' must be a string"),
        (b'{"done": 1, "advance": 1}', "'done' and 'advance' exclude each other"),
    ],
)
def test_parse_line_rejects_with_a_short_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_line(STDOUT_PREFIX + body + b"\n")
    assert str(err.value) == reason


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_parse_line_of_arbitrary_bytes_raises_only_protocol_error(rest: bytes) -> None:
    for line in (rest, STDOUT_PREFIX + rest):
        try:
            parse_line(line)
        except ProtocolError:
            pass


@settings(max_examples=300)
@given(stdout_maps)
def test_parse_line_of_near_miss_objects_raises_only_protocol_error(d: dict[str, Any]) -> None:
    try:
        report = parse_line(STDOUT_PREFIX + orjson.dumps(d) + b"\n")
    except ProtocolError:
        return
    assert report is not None
    assert set(d) <= {"done", "advance", "total", "checkpoint", "message"}
    assert report.has_checkpoint == ("checkpoint" in d)
