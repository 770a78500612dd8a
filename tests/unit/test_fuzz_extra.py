"""Property-based fuzzing that the other unit suites do not do yet (issue 6).

- ``StreamLog.feed``: any bytes cut into any chunks, with any rotation size, end up in
  the log files as exactly the same lines, each stamped once with the timestamp of the
  read that brought its first byte, in order across rotated files, no line cut in two.
- ``lifecycle.step``: random event histories, delivered the way the master delivers them
  (exits only while an attempt lives, timers only while armed, a spawn failure right
  after a spawn), never break the invariants behind promises 1-3: a slot is held exactly
  while an attempt lives, at most one spawn per start and only from pending, terminal
  states are left only by a restart request and always carry a reason.
- ``ControlServer.handle`` on a real ``Master`` (with a backend that starts nothing):
  any request bytes give one JSON-serialisable reply, never an exception, and leave the
  store committable and the slot count right.
- Settings, ranges and shard ids past what the run database can hold give one-line
  errors, not tracebacks (regressions: ``-j 2**63`` and ``--range`` with 20-digit ends
  crashed ``orch run``; a NUL in a shard id crashed the master).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import lifecycle as lc
from orchestrator.backends import AttemptHandle, AttemptSpec, Backend
from orchestrator.config import Restart, build_task
from orchestrator.control import ControlServer
from orchestrator.errors import ConfigError, OrchError, ShardListError
from orchestrator.lifecycle import Intent, State
from orchestrator.logs import LogFile, StreamLog, protocol_lines
from orchestrator.loop import Loop
from orchestrator.ports import NoGuard, Ports
from orchestrator.sources import load_shards
from orchestrator.store import RunRow, Store

# --- StreamLog.feed ---------------------------------------------------------------------------


def _expected_log(data: bytes, cuts: list[int], stamps: list[bytes]) -> bytes:
    """What the log must hold: each line stamped with the read that brought its first byte,
    a last line without a newline ended by one."""
    out = []
    bounds = list(zip([0, *cuts], [*cuts, len(data)], strict=True))

    def read_of(pos: int) -> int:
        return next(i for i, (lo, hi) in enumerate(bounds) if lo <= pos < hi)

    line_start = 0
    while line_start < len(data):
        end = data.find(b"\n", line_start)
        line = data[line_start : end + 1] if end >= 0 else data[line_start:] + b"\n"
        out.append(stamps[read_of(line_start)] + line)
        line_start = end + 1 if end >= 0 else len(data)
    return b"".join(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=600) | st.lists(st.sampled_from([b"\n", b"ab", b"\r", b"##orch {}",
                                                            b"#", b"##or", b"\xff", b"\n\n"]),
                                            max_size=80).map(b"".join),
    cut_seeds=st.lists(st.integers(0, 10**6), max_size=30),
    max_bytes=st.sampled_from([0, 8, 20, 64, 200, 10**6]),
    echo=st.booleans(),
)
def test_any_chunking_gives_the_same_lines_each_stamped_once(
    data: bytes, cut_seeds: list[int], max_bytes: int, echo: bool
) -> None:
    cuts = sorted({s % (len(data) + 1) for s in cut_seeds}) if data else []
    stamps = [b"<T%d> " % i for i in range(len(cuts) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.out")
        errors: list[str] = []
        log = StreamLog(LogFile(path, max_bytes, 100, errors.append), echo=echo)  # keeps all
        returned = []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True)):
            returned.append(log.feed(data[lo:hi], stamps[i]))
        returned.append(log.flush(b"<END> "))
        log.file.close()
        files = sorted(Path(tmp).iterdir(),  # oldest first: x.out.N .. x.out.1, x.out
                       key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        contents = [p.read_bytes() for p in files]
        written = b"".join(contents)
    assert errors == []
    assert written == _expected_log(data, cuts, stamps)
    # rotated only at line ends: no line straddles two files
    assert all(c.endswith(b"\n") for c in contents if c)
    # What feed returns (for the protocol parser and the verbose view) is the same lines;
    # without echo, at least every protocol line.
    whole = data if data.endswith(b"\n") or not data else data + b"\n"
    if echo:
        assert b"".join(returned) == whole
    else:
        assert [ln for block in returned for ln in protocol_lines(block)] == protocol_lines(whole)


# --- lifecycle.step --------------------------------------------------------------------------

_KINDS = ["start", "exit", "kill_hung", "kill_stalled", "kill_memory", "stop", "shutdown",
          "restart", "backoff", "grace", "spawned"]


@st.composite
def _policies(draw: st.DrawFn) -> lc.Policy:
    return lc.Policy(
        restart=draw(st.sampled_from(list(Restart))),
        max_restarts=draw(st.integers(0, 4)),
        backoff_initial_s=draw(st.sampled_from([0.0, 0.05, 1.0])),
        backoff_max_s=draw(st.sampled_from([0.0, 0.5, 8.0])),
        backoff_factor=draw(st.sampled_from([1.0, 2.0])),
        backoff_jitter=draw(st.sampled_from([0.0, 0.2])),
        backoff_reset_s=draw(st.sampled_from([0.5, 60.0])),
        stop_timeout_s=draw(st.sampled_from([0.0, 1.0])),
    )


@settings(max_examples=500, deadline=None)
@given(
    policy=_policies(),
    steps=st.lists(st.tuples(st.sampled_from(_KINDS), st.floats(0, 100),
                             st.sampled_from([0, 1, 2, -9, -15]),
                             st.sampled_from([None, None, None, "enoent", "emfile"])),
                   max_size=60),
    u=st.floats(0, 0.999),
)
def test_random_histories_keep_the_lifecycle_invariants(
    policy: lc.Policy, steps: list[tuple[str, float, int, str | None]], u: float
) -> None:
    shard = lc.Shard()
    now = 0.0
    live = False  # an attempt's process group exists
    timers: set[lc.TimerKind] = set()
    spawns = 0

    def apply(event: lc.Event, spawn_fails: str | None = None) -> None:
        nonlocal shard, live, spawns
        old = shard
        shard, actions = lc.step(old, event, now, policy, lambda: u)
        spawned = [a for a in actions if isinstance(a, lc.Spawn)]
        # Promise 1: one spawn per Start of a pending shard, never while an attempt lives.
        if spawned:
            assert isinstance(event, lc.Start) and old.state is State.PENDING, (event, old)
            assert len(spawned) == 1 and not live
            assert spawned[0].attempt == old.attempt + 1 == shard.attempt
            spawns += 1
        elif isinstance(event, lc.Start):
            assert old.state is not State.PENDING
        for a in actions:
            if isinstance(a, lc.Signal):
                assert live, (event, old, a)  # only an attempt that exists is signalled
            elif isinstance(a, lc.SetTimer):
                timers.add(a.kind)
                assert a.at >= now
            elif isinstance(a, lc.CancelTimer):
                timers.discard(a.kind)
        if shard.state is State.STOPPING and old.state is not State.STOPPING:
            assert lc.Signal(signal.SIGTERM) in actions
            assert lc.SetTimer(lc.TimerKind.GRACE, now + policy.stop_timeout_s) in actions
        if isinstance(event, lc.GraceElapsed) and old.state is State.STOPPING:
            assert actions == [lc.Signal(signal.SIGKILL)]
        # Terminal states are left only by a user's restart, and always say why (promise 2).
        if old.state.terminal and shard.state is not old.state:
            assert isinstance(event, lc.RestartRequested), (event, old, shard)
        if shard.state.terminal:
            assert shard.reason, shard
        if shard.state is State.DONE and old.state is not State.DONE:
            assert event == lc.Exited(0) and old.state is State.RUNNING  # promise 3
            assert policy.restart is not Restart.ALWAYS
        if shard.state is State.STOPPED and old.state is not State.STOPPED:
            assert isinstance(event, lc.StopRequested) or (
                isinstance(event, lc.Exited) and old.intent in (Intent.STOP, Intent.SHUTDOWN))
        if shard.state is State.FAILED and old.state is not State.FAILED and not (
                shard.reason or "").startswith("cannot start"):
            assert policy.restart is Restart.NEVER or shard.failures > policy.max_restarts
        if shard.state is State.BACKOFF:
            assert lc.TimerKind.BACKOFF in timers and shard.ready_at is not None
        if spawned:
            if spawn_fails is None:
                live = True
            else:  # the master reports a failed spawn at once, from inside the Spawn action
                apply(lc.SpawnFailed(spawn_fails, spawn_fails == "emfile"))
        # Slot accounting: a slot is held exactly while an attempt lives.
        assert shard.state.holds_slot == live, (event, old, shard, live)

    for kind, dt, code, spawn_fails in steps:
        now += dt
        match kind:
            case "start":
                apply(lc.Start(), spawn_fails)
            case "spawned":
                apply(lc.Spawned())
            case "exit" if live:
                live = False  # the leader exited and its group is gone
                timers.discard(lc.TimerKind.GRACE)
                apply(lc.Exited(code))
            case "kill_hung" | "kill_stalled" | "kill_memory" if shard.state is State.RUNNING:
                intent = {"kill_hung": Intent.HUNG, "kill_stalled": Intent.STALLED,
                          "kill_memory": Intent.MEMORY}[kind]
                apply(lc.Kill(intent, f"{intent.value}: fuzz"))
            case "stop" | "shutdown":
                apply(lc.StopRequested(Intent.STOP if kind == "stop" else Intent.SHUTDOWN))
            case "restart":
                apply(lc.RestartRequested())
            case "backoff" if lc.TimerKind.BACKOFF in timers:
                timers.discard(lc.TimerKind.BACKOFF)
                apply(lc.BackoffElapsed())
            case "grace" if lc.TimerKind.GRACE in timers:
                timers.discard(lc.TimerKind.GRACE)
                apply(lc.GraceElapsed())
    assert shard.attempt == spawns


# --- ControlServer.handle ---------------------------------------------------------------------


class _NoProcesses(Backend):
    """Starts nothing: every attempt 'runs' until it is signalled, and no signal ends it."""

    def start(self, spec: AttemptSpec) -> AttemptHandle:
        if spec.index == 2:
            from orchestrator.errors import SpawnError

            raise SpawnError("executable not found: 'fuzz'")
        return AttemptHandle(spec=spec, pid=None, pgid=None, create_time=None)

    def signal(self, handle: AttemptHandle, signum: int) -> None:
        pass

    def live(self) -> list[AttemptHandle]:
        return []

    def kill_all(self) -> None:
        pass

    def reap(self) -> None:
        pass

    def stamp(self) -> list[AttemptHandle]:
        return []

    def rss(self, handles: Sequence[AttemptHandle]) -> list[int | None]:
        return [None for _ in handles]


class _NoChannel:
    """No shard reports: the heartbeat channel is never heard from."""

    endpoint = "ipc:///nonexistent/hb.sock"
    received = 0
    garbage = 0

    def bind(self, on_message: Any) -> None:
        pass

    def reply(self, identity: bytes, msg: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Events:
    endpoint = "ipc:///nonexistent/events.sock"

    def publish(self, event: dict[str, Any]) -> None:
        orjson.dumps(event)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def master_and_server() -> Iterator[tuple[Any, ControlServer]]:
    from orchestrator.master import Master

    base = tempfile.mkdtemp(prefix="orch-fz-", dir="/tmp")  # short: a Unix socket path
    try:
        run_dir = os.path.join(base, "run")
        os.makedirs(os.path.join(run_dir, "logs"))
        task = build_task(name="fuzz", file_task=None, file_path=None, cwd=base,
                          overrides={"command": ["true", "{index}"], "split": 4})
        shards = load_shards(split=4)
        store = Store.create(os.path.join(run_dir, "state.db"),
                             RunRow(id="fuzz-run", name="fuzz", task_json=task.to_json(),
                                    source="--split 4", shard_count=4, started_at=0.0,
                                    jobs=None),
                             ((s.id, s.record, s.line) for s in shards))
        loop = Loop(os_signals=False)
        server = ControlServer(loop, os.path.join(base, "c.sock"), _Events.endpoint)
        ports = Ports(loop=loop, backend=_NoProcesses(), channel=_NoChannel(), control=server,
                      events=_Events(), guardian=NoGuard())
        master = Master(run_id="fuzz-run", run_dir=run_dir, task=task, shards=shards,
                        store=store, ports=ports, jobs=4)
        master.open()
        try:
            yield master, server
        finally:
            server.close()
            master.loop.close()
            store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=6),
    st.sampled_from(["0", "1", "2", "3", "nope", ""]), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_requests = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), _values),
     "op": st.one_of(st.sampled_from(["ping", "status", "stop", "restart", "scale", "subscribe",
                                      "nope"]), _values)},
    optional={"shard": _values, "jobs": _values, "x": _values},
)


def _to_bytes(req: dict[str, Any]) -> bytes:
    import json

    return json.dumps(req).encode()  # integers past 64 bits go out too


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(_requests.map(_to_bytes), st.binary(max_size=200),
                 st.sampled_from([b"", b"[]", b"null", b"{}", b"[" * 5000, b'{"v":1}'])))
def test_control_handle_never_raises(
    master_and_server: tuple[Any, ControlServer], raw: bytes
) -> None:
    master, server = master_and_server
    reply = server.handle(raw)
    master.loop.run_once(0)  # what the loop does next: schedule, group commit
    assert isinstance(reply, dict) and reply["v"] == 1 and isinstance(reply["ok"], bool)
    orjson.dumps(reply)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and "\n" not in reply["error"]
    master.store.commit()  # the store is never left with a statement it cannot commit
    holding = sum(run.life.state.holds_slot for run in master.shard_runs)
    assert master.running == holding <= max(master.jobs, holding)
    assert master.tally.unfinished == sum(not run.life.state.terminal for run in master.shard_runs)


# --- numbers and ids past what the store holds ----------------------------------------------------

_big = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, 2**64,
                                                                 -(2**63) - 1]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ints=st.dictionaries(st.sampled_from(["jobs", "max_restarts", "log_backups", "split"]),
                            _big, min_size=1),
       size=st.sampled_from([None, "1G", "99999999999999999999G", "9223372036854775808",
                             "9223372036854775807"]))
def test_integer_settings_are_bounded_or_refused_in_one_line(
    ints: dict[str, int], size: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    overrides: dict[str, Any] = {"command": ["true"], "split": 1, **ints}
    if size is not None:
        overrides["max_memory"] = size
    try:
        task = build_task(name="t", file_task=None, file_path=None, overrides=overrides, cwd="/")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    for value in (task.jobs, task.max_restarts, task.log_backups, task.max_memory_bytes):
        assert value is None or 0 <= value <= 2**63 - 1
    db = tmp_path_factory.mktemp("db") / "state.db"
    store = Store.create(str(db), RunRow(id="r", name="t", task_json=task.to_json(), source="s",
                                         shard_count=1, started_at=0.0, jobs=task.jobs),
                         [("0", {}, 0)])
    store.close()


@settings(max_examples=200, deadline=None)
@given(_big, st.integers(0, 5))
def test_ranges_past_64_bits_are_refused_in_one_line(start: int, width: int) -> None:
    try:
        shards = load_shards(range_=f"{start}..{start + width}")
    except ShardListError as exc:
        assert "\n" not in str(exc)
        return
    for shard in shards:
        orjson.dumps(dict(shard.record))  # what the store will do with it


@pytest.mark.parametrize("name, text", [
    ("x.jsonl", '{"id": "a\\u0000b"}\n'), ("x.csv", "id\na\0b\n"), ("x.txt", "a\0b\n"),
    ("x.tsv", "id\tv\na\0b\t1\n"),
])
def test_a_nul_in_a_shard_id_is_a_one_line_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(OrchError) as info:
        load_shards(str(path))
    assert "NUL" in str(info.value) and name in str(info.value) and "\n" not in str(info.value)
