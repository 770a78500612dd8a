"""Fuzzing a live run's sockets: the heartbeat endpoint and the control endpoint.

tests/integration/test_progress.py already sends a fixed list of ~40 malformed frames
and a few stale ones and checks the counters. This goes further:

- volume: thousands of hypothesis-generated frames (random bytes, near-miss protocol
  maps with every field of every wrong type, other runs, forged shard ids, stale
  attempts, wrong versions, many-part messages, integers past 64 bits) and a burst of
  20,000 frames at once; the counters must match an oracle frame for frame, and every
  stale or forged checkpoint/END must get exactly one NACK;
- frames over the size limits and raw bytes on a plain Unix connection (not ZMTP),
  including idle half-open connections while the run is steered;
- the control socket: hypothesis-generated requests each get a well-formed refusal and
  never stop, restart or rescale the run;
- out-of-range integers from the *current* attempt (regression: a ``done`` of 2**63
  crashed the master when it flushed progress to SQLite) and ``orch scale --jobs 2**63``
  (regression: the same overflow from the control socket).

At the end every run finishes with the right results.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import zmq
from helpers.reliability import DEADLINE_S, PYTHON, Env, Run, control, poll_for, status, wait_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import protocol as proto

SHARD = """\
import json, os, time, shards
from pathlib import Path
here = Path(__file__).parent
me = shards.info()
shards.progress(1, total=3)
(here / f"ready{me.index}").write_text("")
deadline = time.monotonic() + 120
while not (here / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.02)  # allowed-sleep: poll interval of the shard's deadline-bounded wait for 'go'
shards.checkpoint({"shard": me.index})
shards.progress(3)
(here / f"result{me.index}").write_text(json.dumps(shards.info().checkpoint))
"""

IDS = ("0", "1", "2")
U64 = 2**64 - 1
I64 = 2**63 - 1


@contextmanager
def dealer(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)


def start_run(env: Env, shards: int = 3, *extra: str) -> tuple[Any, Run]:
    script = env.script("shard.py", SHARD)
    proc = env.start("run", "--split", str(shards), "--heartbeat-interval", "0.5", *extra, "--",
                     PYTHON, script)
    run = wait_run(env)
    for i in range(shards):
        ready = env.cwd / f"ready{i}"
        poll_for(lambda r=ready: r.exists() or proc.poll() is not None, timeout=DEADLINE_S)
        assert ready.exists(), (env.cwd / "orch.stderr").read_text()[-3000:]
    return proc, run


def finish(env: Env, proc: Any, run: Run, shards: int = 3) -> dict[str, Any]:
    (env.cwd / "go").touch()
    code = proc.wait(timeout=DEADLINE_S)
    output = (env.cwd / "orch.stdout").read_text() + (env.cwd / "orch.stderr").read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    detail = env.status(run.id)
    assert (detail["state"], detail["exit_code"]) == ("done", 0)
    for i, shard in enumerate(detail["shards"]):
        summary = (shard["state"], shard["attempts"], shard["done"], shard["total"])
        assert summary == ("done", 1, 3, 3), shard
        assert shard["checkpoint"] == {"shard": i}
        assert json.loads((env.cwd / f"result{i}").read_text()) == {"shard": i}
    assert len(detail["shards"]) == shards
    return dict(detail)


# --- frames and their oracle ------------------------------------------------------------------


def classify(data: bytes, run_id: str) -> tuple[str, bool]:
    """What the master must make of one single-part frame: ("garbage" | "stale" | "valid",
    whether it must answer with a NACK)."""
    try:
        msg = proto.decode(data)
    except proto.ProtocolError:
        return "garbage", False
    if msg.run != run_id:
        return "garbage", False
    answers = msg.kind in (proto.Kind.CHECKPOINT, proto.Kind.END)
    if msg.shard not in IDS:
        return "garbage", answers  # a forged shard id: counted as garbage, still NACKed
    if msg.attempt != 1:
        return "stale", answers
    return "valid", answers


_ints = st.sampled_from([0, 1, 2, 5, -1, I64, I64 + 1, U64, U64 + 1, 10**30])
_odd = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                             st.integers(), max_size=2),
)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), U64), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def _near_miss(run_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Protocol maps where every field may be right, wrong, missing or of the wrong type."""
    field = {
        "v": st.one_of(st.just(1), st.sampled_from([0, 2, "1", 1.0, True]), _odd),
        "k": st.one_of(st.sampled_from(["hb", "cp", "end", "ack", "nack"]),
                       st.sampled_from(["zz", "HB", ""]), _odd),
        "run": st.one_of(st.just(run_id), st.sampled_from(["another", "", run_id + "x"]), _odd),
        "sh": st.one_of(st.sampled_from(IDS), st.sampled_from(["nope", "", "0 ", "x" * 5000]),
                        _odd),
        "a": st.one_of(st.sampled_from([1, 2, 3, 0]), _ints, _odd),
        "seq": st.one_of(_ints, _odd),
        "done": st.one_of(_ints, _odd),
        "total": st.one_of(_ints, _odd),
        "rss": st.one_of(_ints, _odd),
        "cp": _json,
        "msg": st.one_of(st.text(max_size=30), _odd),
        "zz": _json,
    }
    return st.fixed_dictionaries(
        {k: field[k] for k in ("v", "k", "run", "sh", "a")},
        optional={k: field[k] for k in ("seq", "done", "total", "rss", "cp", "msg", "zz")},
    ).flatmap(lambda d: st.sets(st.sampled_from(sorted(d)), max_size=2).map(
        lambda drop: {k: v for k, v in d.items() if k not in drop}))


def _plausible(run_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed messages, mostly for this run, from the wrong attempt or a forged shard."""
    return st.builds(
        lambda k, run, sh, a, seq, done, cp: {
            "v": 1, "k": k, "run": run, "sh": sh, "a": a, "seq": seq, "done": done,
            **({"cp": cp} if k == "cp" else {})},
        st.sampled_from(["hb", "cp", "end", "cp", "end", "ack", "nack"]),
        st.sampled_from([run_id] * 4 + ["other-run"]),
        st.sampled_from([*IDS, "nope", "0\n"]),
        st.sampled_from([1, 2, 3, 9]),
        st.integers(0, 10**6), st.integers(0, 10**15), _json,
    )


def _raw_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"", b"{}", b"[]", b"null", b"1", b'"hb"', b"{" * 3000, b"[" * 2000,
                         b'{"v":1,"k":"hb"', b'{"v":1}\x00', b"\xef\xbb\xbf{}",
                         b'{"v":1,"k":"hb","run":"\xff\xfe","sh":"0","a":1}']),
        _json.map(lambda v: json.dumps(v).encode()),
    )


def _encode(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()  # json, not orjson: integers past 64 bits must go out too


def test_hypothesis_frames_on_the_heartbeat_endpoint(env: Env) -> None:
    """Every frame is dropped and counted exactly as the protocol says, every stale or
    forged checkpoint/END gets exactly one NACK, and the run's results are untouched."""
    proc, run = start_run(env)
    endpoint = str(run.row()["endpoint"])
    expected: Counter[str] = Counter()
    nacks = 0
    sent = 0
    with dealer(endpoint) as sock:

        def send(data: bytes) -> None:
            nonlocal nacks, sent
            what, answers = classify(data, run.id)
            if what == "valid":  # never change the run: make it an older attempt's
                d = orjson.loads(data)
                d["a"] = 7
                data = _encode(d)
                what, answers = classify(data, run.id)
            assert what != "valid"
            expected[what] += 1
            nacks += answers
            sent += 1
            sock.send(data)

        @settings(max_examples=400, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.one_of(_near_miss(run.id).map(_encode), _raw_frames(),
                                  _plausible(run.id).map(_encode)),
                        min_size=1, max_size=25),
               st.lists(st.lists(st.binary(max_size=20), min_size=2, max_size=12), max_size=2))
        def blast(frames: list[bytes], multipart: list[list[bytes]]) -> None:
            for data in frames:
                send(data)
            for parts in multipart:
                sock.send_multipart(parts)
                expected["garbage"] += 1  # anything but one frame is garbage

        blast()
        # Volume: a burst of 20,000 frames and a message of 5,000 parts, all at once.
        burst = [os.urandom(1 + i % 64) for i in range(10_000)]
        burst += [_encode({"v": 1, "k": "hb", "run": run.id, "sh": IDS[i % 3], "a": 2 + i % 5,
                           "done": i}) for i in range(10_000)]
        for data in burst:
            send(data)
        sock.send_multipart([b"p"] * 5000)
        expected["garbage"] += 1
        replies: list[proto.Message] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(replies) < nacks and time.monotonic() < deadline:
            if sock.poll(200):
                replies.append(proto.decode(sock.recv()))
        assert not sock.poll(300), "an answer that should not have come"
    assert len(replies) == nacks, (len(replies), nacks)
    assert all(r.kind is proto.Kind.NACK for r in replies), Counter(r.kind for r in replies)

    want = {"garbage": expected["garbage"], "stale": expected["stale"]}
    got = poll_for(lambda: (s := status(run))["dropped"] == want and s, timeout=DEADLINE_S)
    assert got, (status(run)["dropped"], want)
    assert (got["items_done"], got["items_total"]) == (3, 9), got
    detail = finish(env, proc, run)
    counters = detail["counters"]
    assert (counters.get("dropped_garbage", 0), counters.get("dropped_stale", 0)) == (
        want["garbage"], want["stale"])
    print(f"\nheartbeat endpoint: {sent} single frames + multipart messages, counted "
          f"{want}, {nacks} NACKs")


# --- raw bytes and oversize frames ---------------------------------------------------------------

#: signature (10 bytes), version 3.0, mechanism NULL (20), as-server (1), filler (31)
ZMTP_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\0" * 48


def _raw_payloads(rng: random.Random) -> list[bytes]:
    huge_header = b"\x06" + (2**62).to_bytes(8, "big")  # a long frame of 2**62 bytes
    ready = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
    return [
        b"",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        rng.randbytes(10_000),
        ZMTP_GREETING[:10],
        ZMTP_GREETING + huge_header,
        ZMTP_GREETING + ready + huge_header + b"x" * 100,
        ZMTP_GREETING + ready + b"\x00\xff" + b"x" * 255,
        b"\xff" + b"\xff" * 8 + b"\x7f\x03\x00" + b"CURVE" + b"\0" * 15 + b"\x01" + b"\0" * 31,
        ZMTP_GREETING.replace(b"NULL", b"PLAIN") + rng.randbytes(300),
    ]


def _unix(path: str) -> socket.socket:
    """A plain Unix stream connection; a full listen backlog (EAGAIN) is waited out."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # allowed-sleep: retry interval of a deadline-bounded connect


def test_raw_bytes_and_oversize_frames_on_both_endpoints(env: Env) -> None:
    """Non-ZMTP bytes, bad greetings, frame headers announcing 2**62 bytes, frames over
    1 MiB (heartbeat) and 64 KiB (control), and 200 idle half-open connections: the master
    keeps answering and supervising, and the results are right."""
    proc, run = start_run(env)
    row = run.row()
    paths = [str(row["endpoint"])[len("ipc://"):], str(row["control"])[len("ipc://"):]]
    rng = random.Random(6)
    idle: list[socket.socket] = []
    try:
        for path in paths:
            for payload in _raw_payloads(rng):
                s = _unix(path)
                try:
                    s.sendall(payload)
                except OSError:
                    pass  # the master may hang up on us mid-send: that is its right
                s.close()
            for _ in range(100):  # idle connections that never finish a handshake
                s = _unix(path)
                s.sendall(ZMTP_GREETING[:5])
                idle.append(s)
        with dealer(str(row["endpoint"])) as big:
            big.send(b"{" + b" " * (proto.MAX_FRAME_BYTES + 1) + b"}")
            big.send(b"x" * (8 << 20))
        with dealer(str(row["control"])) as big:
            big.send(orjson.dumps({"v": 1, "op": "ping", "pad": "x" * (70 * 1024)}))
            assert not big.poll(500), "a control frame over 64 KiB was answered"
        # Still steerable from another terminal while the idle connections hang.
        t0 = time.monotonic()
        answer = env.orch("status", run.id, "--json")
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["state"] == "running"
        latency = time.monotonic() - t0
        reply = control(str(row["control"]), {"v": 1, "op": "ping"})
        assert reply is not None and reply["ok"], reply
        assert status(run)["counts"] == {"running": 3}
    finally:
        for s in idle:
            s.close()
    finish(env, proc, run)
    print(f"\nraw bytes: {2 * len(_raw_payloads(rng))} raw connections, 200 idle ones, "
          f"3 oversize frames; orch status answered in {latency:.2f}s")


# --- the control socket ---------------------------------------------------------------------------

_ops = st.sampled_from(["ping", "status", "stop", "restart", "scale", "subscribe", "nope", "",
                        "PING"]) | _odd
_requests = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), st.sampled_from([0, 2, "1", 1.0, True, U64]), _odd),
     "op": _ops},
    optional={
        "shard": st.one_of(st.sampled_from(["nope", "", "0 ", "x" * 300]), _odd),
        "jobs": st.one_of(_ints, _odd),
        "zz": _json,
    },
)


def _harmless(data: bytes) -> bool:
    """False for a request the master would carry out and that changes the run (``stop``,
    ``restart`` of a real shard or of every shard, a valid ``scale``): the fuzzer never
    sends those."""
    try:
        req = orjson.loads(data)  # as the master reads it
    except orjson.JSONDecodeError:
        return True
    if not isinstance(req, dict) or req.get("v") != 1:
        return True
    op, shard, jobs = req.get("op"), req.get("shard"), req.get("jobs")
    if op == "stop":
        return shard is not None and shard not in IDS
    if op == "restart":
        return shard is not None and shard not in IDS
    if op == "scale":
        return not (type(jobs) is int and 1 <= jobs <= I64)
    return True


def test_hypothesis_requests_on_the_control_socket(env: Env) -> None:
    """Every request gets one well-formed reply; only ping, status and subscribe succeed;
    out-of-range numbers are refused, never crash the master (regression: scale with
    jobs=2**63 overflowed SQLite and killed it); the run is untouched."""
    proc, run = start_run(env)
    endpoint = str(run.row()["control"])
    replies: Counter[str] = Counter()
    with dealer(endpoint) as sock:

        def ask(data: bytes) -> dict[str, Any]:
            sock.send(data)
            assert sock.poll(int(DEADLINE_S * 1000)), f"no reply to {data[:200]!r}"
            reply = orjson.loads(sock.recv())
            assert isinstance(reply, dict) and reply.get("v") == 1, reply
            assert isinstance(reply.get("ok"), bool), reply
            assert reply["ok"] or (isinstance(reply.get("error"), str) and reply["error"]), reply
            replies["ok" if reply["ok"] else "refused"] += 1
            return reply

        @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(_requests.map(_encode), _raw_frames()).filter(_harmless))
        def fuzz(data: bytes) -> None:
            reply = ask(data)
            try:
                req = orjson.loads(data)
            except orjson.JSONDecodeError:
                req = None
            if not (isinstance(req, dict) and req.get("v") == 1
                    and req.get("op") in ("ping", "status", "subscribe")):
                assert not reply["ok"], (data[:300], reply)

        fuzz()
        for jobs in (0, -1, I64 + 1, U64, 10**30, 1.5, True, "3"):
            reply = ask(_encode({"v": 1, "op": "scale", "jobs": jobs}))
            assert not reply["ok"] and "jobs" in reply["error"], (jobs, reply)
        assert ask(_encode({"v": 1, "op": "ping"}))["ok"]
    # The CLI refuses too, in one line, and the master lives on.
    scaled = env.orch("scale", run.id, "--jobs", str(I64 + 1))
    assert scaled.returncode != 0 and "Traceback" not in scaled.stderr, scaled.stderr
    assert len(scaled.stderr.strip().splitlines()) == 1, scaled.stderr
    live = status(run)
    assert (live["counts"], live["jobs"]) == ({"running": 3}, 3), live
    finish(env, proc, run)
    print(f"\ncontrol socket: replies {dict(replies)}")


# --- integers past 64 bits from the current attempt ------------------------------------------

STDOUT_SHARD = """\
echo '##orch {"advance": 9223372036854775807, "total": 5}'
echo '##orch {"advance": 9223372036854775807}'
echo '##orch {"done": 9223372036854775808}'
echo '##orch {"total": 18446744073709551615}'
echo '##orch {"checkpoint": {"n": 18446744073709551615}}'
"""


def test_counts_past_64_bits_from_the_current_attempt_never_crash_the_master(env: Env) -> None:
    """Regression: ``done`` >= 2**63 from the current attempt reached SQLite and killed the
    master at the next progress flush (run lost). Now such frames are dropped as garbage
    (docs/protocol.md: integers are 64-bit), stdout lines with them are bad lines, and
    sums of advances saturate at 2**63-1."""
    proc, run = start_run(env, 1, "--heartbeat-timeout", "60", "--heartbeat-interval", "30")
    endpoint = str(run.row()["endpoint"])
    forged = [
        {"done": I64 + 1}, {"total": U64}, {"rss": I64 + 1}, {"seq": U64},
        {"done": U64 + 1}, {"a": I64 + 1},
    ]
    with dealer(endpoint) as sock:
        for extra in forged:
            sock.send(_encode({"v": 1, "k": "hb", "run": run.id, "sh": "0", "a": 1, **extra}))
        sock.send(_encode({"v": 1, "k": "cp", "run": run.id, "sh": "0", "a": 1, "seq": 3,
                           "done": I64 + 1, "cp": {"x": 1}}))
        expected = {"garbage": len(forged) + 1, "stale": 0}
        assert poll_for(lambda: status(run)["dropped"] == expected, timeout=DEADLINE_S), status(run)
        # A plain beat with the same counts: the progress flush it causes is the moment the
        # overflow used to strike. Once it is in the database, the master is past it.
        sent_at = time.time()
        sock.send(_encode({"v": 1, "k": "hb", "run": run.id, "sh": "0", "a": 1, "done": 1,
                           "total": 3}))
        assert poll_for(lambda: (run.shards()["0"]["heartbeat_at"] or 0) >= sent_at,
                        timeout=DEADLINE_S), run.shards()
    live = status(run)
    assert (live["items_done"], live["items_total"]) == (1, 3), live
    finish(env, proc, run, shards=1)


def test_counts_past_64_bits_on_stdout_are_bad_lines_and_sums_saturate(env: Env) -> None:
    """The same numbers in ``##orch`` lines: a count past 2**63-1 makes the line a bad one,
    and advances that add up past it stop at 2**63-1 (they used to overflow SQLite)."""
    script = env.script("big.sh", STDOUT_SHARD)
    done = env.orch("run", "--split", "1", "--", "sh", script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    detail = env.status(env.run_id())
    shard = detail["shards"][0]
    assert (shard["state"], shard["done"], shard["total"]) == ("done", I64, 5), shard
    assert shard["checkpoint"] == {"n": U64}
    assert detail["counters"].get("bad_stdout_lines") == 2, detail["counters"]
