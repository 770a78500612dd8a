"""Issue 10: what a PHP/shell/Node batch user trips over, tested without processes.

Each test names the item of issue 10 it holds to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_master import CP, Harness

from orchestrator.config import build_task
from orchestrator.errors import RET_FAILED, ConfigError, TemplateError, UnitError, closest
from orchestrator.lifecycle import Intent
from orchestrator.liveness import Watch
from orchestrator.sources import load_shards
from orchestrator.store import RunRow, Store, StoreUnwritable
from orchestrator.template import CommandTemplate, Template, check_fields, shard_values
from orchestrator.units import parse_timeout

# --- item 2: only {identifier} / {dotted.identifier} is a field -------------------------


@pytest.mark.parametrize(
    "text",
    [
        'echo "##orch {\\"total\\": 10}"',  # JSON in sh -c
        '##orch {"done": 1, "total": 3}',
        "echo ${HOME} ${#x} ${x:-y}",  # shell parameter expansion
        "awk '{print $1} END {n++}'",  # awk programs
        "find . -exec cat {} ;",  # an empty pair
        "{1..5} {a,b} {a b} {x-y} {9} {.a} {a.} {a..b}",
        "lone { and } and {",
    ],
)
def test_non_identifier_braces_pass_through(text: str) -> None:
    t = Template.compile(text, where="argv[2]")
    assert t.fields == frozenset()
    assert t.render({}) == text


def test_identifier_and_dotted_fields_are_fields() -> None:
    t = Template.compile("{id} {checkpoint.page} {a_b.c2.0} {_x}", where="w")
    assert t.fields == {"id", "checkpoint.page", "a_b.c2.0", "_x"}


def test_double_braces_still_escape() -> None:
    t = Template.compile("{{id}} {{{id}}} {\"k\": {id}}", where="w")
    assert t.fields == {"id"}
    assert t.render({"id": "7"}) == '{id} {7} {"k": 7}'


def test_sh_c_json_line_renders_literally_and_quotes_fields() -> None:
    ct = CommandTemplate.compile(
        ["sh", "-c", 'echo "##orch {\\"total\\": 10, \\"id\\": \\"{id}\\"}"'], {}, where="c"
    )
    argv = ct.render_argv({"id": "a b"})
    assert argv[2] == "echo \"##orch {\\\"total\\\": 10, \\\"id\\\": \\\"'a b'\\\"}\""


def test_dotted_fields_reach_into_checkpoint_and_record() -> None:
    shards = load_shards(split=1)
    ct = CommandTemplate.compile(["p", "--page={checkpoint.page}"], {}, where="c")
    first = shard_values(shards[0], 1, "", fields=ct.fields, checkpoint_value=None)
    assert ct.render_argv(first) == ["p", "--page="]
    later = shard_values(
        shards[0], 1, '{"page": 7}', fields=ct.fields, checkpoint_value={"page": 7}
    )
    assert ct.render_argv(later) == ["p", "--page=7"]


def test_dotted_record_field(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "addr": {"city": "Oslo", "zip": ["0150"]}}\n')
    shards = load_shards(str(path))
    ct = CommandTemplate.compile(["p", "{addr.city}", "{addr.zip.0}", "{addr.nope}"], {}, where="c")
    check_fields(ct, shards)
    values = shard_values(shards[0], 1, fields=ct.fields)
    assert ct.render_argv(values) == ["p", "Oslo", "0150", ""]


def test_dotted_field_with_unknown_root_is_refused() -> None:
    ct = CommandTemplate.compile(["p", "{chekpoint.page}"], {}, where="c")
    with pytest.raises(TemplateError, match="did you mean 'checkpoint'"):
        check_fields(ct, load_shards(split=2))


def test_idx_suggests_index() -> None:
    ct = CommandTemplate.compile(["p", "{idx}"], {}, where="c")
    with pytest.raises(TemplateError) as info:
        check_fields(ct, load_shards(split=2))
    assert "no field 'idx'" in str(info.value)
    assert str(info.value).endswith("did you mean 'index'?")


@pytest.mark.parametrize(
    ("word", "candidates", "expected"),
    [
        ("idx", ["index", "count", "id", "checkpoint"], "index"),
        ("indx", ["index", "count", "id", "checkpoint"], "index"),
        ("merchant", ["id", "name", "merchant_id"], "merchant_id"),
        ("nmae", ["id", "name"], "name"),
        ("comand", ["command", "call", "cwd"], "command"),
        ("zzz", ["index", "count"], None),
    ],
)
def test_closest(word: str, candidates: list[str], expected: str | None) -> None:
    assert closest(word, candidates) == expected


# --- item 1: a shard that never spoke ZeroMQ is judged alive by its process ----------------


def _task(cli: dict[str, object] | None = None, file: dict[str, object] | None = None) -> object:
    return build_task(
        name="t",
        file_task={"split": 1, **(file or {})},
        file_path="/x/orch.toml",
        overrides={"command": ("php", "slow.php"), **(cli or {})},
        cwd="/",
    )


def _watch(task: object, started_at: float = 0.0) -> Watch:
    return Watch(
        started_at=started_at,
        heartbeat_timeout_s=task.heartbeat_timeout_s,  # type: ignore[attr-defined]
        stall_timeout_s=task.stall_timeout_s,  # type: ignore[attr-defined]
        require_heartbeat=task.require_heartbeat,  # type: ignore[attr-defined]
        heartbeat_always=task.heartbeat_timeout_set,  # type: ignore[attr-defined]
    )


def test_stdout_protocol_shard_with_slow_query_is_not_hung() -> None:
    """##orch {"done":0,"total":3}, then a 15 s query: defaults never call that hung."""
    w = _watch(_task())
    w.beat(1.0, done=0, total=3, sdk=False)
    assert w.next_deadline() is None
    assert w.verdict(1000.0) is None


def test_sdk_shard_keeps_the_ten_second_default() -> None:
    task = _task()
    assert task.heartbeat_timeout_s == 10.0  # type: ignore[attr-defined]
    w = _watch(task)
    w.beat(1.0, sdk=True)
    assert w.next_deadline() == 11.0
    verdict = w.verdict(11.0)
    assert verdict is not None and verdict[0] is Intent.HUNG


def test_explicit_heartbeat_timeout_applies_to_stdout_shards() -> None:
    for task in (_task({"heartbeat_timeout": "20s"}), _task(file={"heartbeat_timeout": "20s"})):
        w = _watch(task)
        w.beat(1.0, done=0, sdk=False)
        verdict = w.verdict(21.0)
        assert verdict is not None and verdict[0] is Intent.HUNG


def test_require_heartbeat_applies_the_default_to_stdout_shards() -> None:
    w = _watch(_task({"require_heartbeat": True}))
    assert w.next_deadline() == 10.0
    w.beat(2.0, sdk=False)
    assert w.next_deadline() == 12.0


def test_stall_timeout_still_catches_a_stuck_stdout_shard() -> None:
    w = _watch(_task({"stall_timeout": "1m"}))
    w.beat(1.0, done=5, sdk=False)
    w.beat(30.0, done=5, sdk=False)
    verdict = w.verdict(61.0)
    assert verdict is not None and verdict[0] is Intent.STALLED


@pytest.mark.parametrize("spelling", ["none", "None", " NONE "])
def test_none_switches_the_checks_off(spelling: str) -> None:
    for where in ({"heartbeat_timeout": spelling, "stall_timeout": spelling},):
        for task in (_task(where), _task(file=where)):
            assert task.heartbeat_timeout_s is None  # type: ignore[attr-defined]
            assert task.stall_timeout_s is None  # type: ignore[attr-defined]
            w = _watch(task)
            w.beat(1.0, done=1, sdk=True)
            assert w.next_deadline() is None


@pytest.mark.parametrize("key", ["heartbeat_timeout", "stall_timeout"])
@pytest.mark.parametrize("zero", [0, "0", "0s", 0.0])
def test_zero_timeout_is_an_error_that_suggests_none(key: str, zero: object) -> None:
    for layer in ("cli", "file"):
        with pytest.raises(ConfigError) as info:
            _task({key: zero}) if layer == "cli" else _task(file={key: zero})
        text = str(info.value)
        assert "'none'" in text and "\n" not in text
        assert (f"--{key.replace('_', '-')}" if layer == "cli" else key) in text


def test_parse_timeout() -> None:
    assert parse_timeout("none", where="w") is None
    assert parse_timeout("15s", where="w") == 15.0
    with pytest.raises(UnitError, match="'none'"):
        parse_timeout("0", where="w")


# --- item 8: a disk that refuses the run's state ------------------------------------------
# SQLite's max_page_count makes the database answer SQLITE_FULL ("database or disk is
# full") exactly as a full disk does, on a real file, without a tmpfs.


def _full_store(tmp_path: Path) -> Store:
    store = Store.create(
        str(tmp_path / "state.db"),
        RunRow(id="r", name="t", task_json={}, source="s", shard_count=2, started_at=1.0, jobs=1),
        [("a", {}, 1), ("b", {}, 2)],
    )
    store.commit()
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # no room to grow
    return store


def test_store_refusing_writes_raises_one_line_and_keeps_everything(tmp_path: Path) -> None:
    store = _full_store(tmp_path)
    try:
        for i in range(3):
            store.set_shard(0, checkpoint={"page": i, "pad": "x" * 50_000}, checkpoint_done=i)
        store.set_shard(1, state="done", reason="exit 0")
        store.add_counter("bad_stdout_lines", 2)
        with pytest.raises(StoreUnwritable) as info:
            store.commit()
        assert str(info.value) == f"{tmp_path / 'state.db'}: No space left on device"
        assert store.dirty and store.failing == "No space left on device"
        with pytest.raises(StoreUnwritable):  # still full: still refused, still kept
            store.commit()
        store.set_shard(0, done=7)  # writes go on being staged while the disk is full
        store._conn.execute("PRAGMA max_page_count = 1000000")  # space freed
        store.commit()
        assert not store.dirty and store.failing is None
    finally:
        store.close()
    reader = Store.open(str(tmp_path / "state.db"), readonly=True)
    try:
        a, b = reader.shards()
        assert (a["checkpoint"]["page"], a["checkpoint_done"], a["done"]) == (2, 2, 7)
        assert (b["state"], b["reason"]) == ("done", "exit 0")
        assert reader.counters().get("bad_stdout_lines") == 2
    finally:
        reader.close()


def test_store_commits_nothing_twice_after_a_refusal(tmp_path: Path) -> None:
    store = _full_store(tmp_path)
    try:
        store.add_counter("n", 1)
        store.set_shard(0, checkpoint={"pad": "y" * 50_000})
        with pytest.raises(StoreUnwritable):
            store.commit()
        store._conn.execute("PRAGMA max_page_count = 1000000")
        store.commit()
        store.add_counter("n", 1)
        store.commit()
        assert store.counters()["n"] == 2  # replayed once, not once per retry
    finally:
        store.close()


# --- item 7: the live view says why, and when a backoff ends ------------------------------


def test_backoff_row_says_retry_in_and_why() -> None:
    from orchestrator import lifecycle as lc
    from orchestrator.shard import ShardRun
    from orchestrator.views.live import waiting

    life = lc.Shard(state=lc.State.BACKOFF, attempt=2, reason="exit 255", ready_at=116.0)
    rt = ShardRun(index=0, id="0", life=life)
    rt.notes = ["PHP Fatal error:  Uncaught Exception: boom", "  thrown in"]
    assert waiting(rt, now=100.0) == (
        "retry in 16s (attempt 2: exit 255: PHP Fatal error: Uncaught Exception: boom)"
    )


class _FakeMaster:
    def __init__(self, running: int) -> None:
        self.running = running

    def counts(self) -> dict[str, int]:
        return {"backoff": 1, "done": 3} if not self.running else {"running": 1, "done": 3}

    def items(self) -> tuple[int, int | None]:
        return 999, 1000


@pytest.mark.parametrize("running", [0, 1])
def test_no_eta_while_the_last_shard_waits(running: int) -> None:
    import io

    from orchestrator.views.live import PlainView

    view = PlainView(out=io.StringIO())
    view._rate.add(0.0, 0)  # a rate exists: 999 items over the window
    line = view.status_line(_FakeMaster(running))  # type: ignore[arg-type]
    assert ("ETA" in line) == bool(running), line


def test_pick_error_prefers_the_line_naming_the_error() -> None:
    from orchestrator.logs import pick_error

    assert pick_error(["Traceback (most recent call last):", '  File "x"', "ValueError: bad"]) == (
        "ValueError: bad"
    )
    assert pick_error(["PHP Fatal error:  boom", "Stack trace:", "#0 {main}"]) == (
        "PHP Fatal error: boom"
    )
    assert pick_error(["just words", "last words"]) == "last words"


# --- item 8 in the master: fake ports, fake clock, a real SQLite file that fills up ---------


@pytest.fixture
def master1(tmp_path: Path) -> Iterator[Harness]:
    """One shard's master on fake ports (tests/unit/test_master.py's harness)."""
    h = Harness(tmp_path / "h", n=1)
    yield h
    if not h.closed:
        h.close()
    h.store.close()


def _fill(h: Harness) -> None:
    pages = h.store._conn.execute("PRAGMA page_count").fetchone()[0]
    h.store._conn.execute(f"PRAGMA max_page_count = {pages}")


def _free(h: Harness) -> None:
    h.store._conn.execute("PRAGMA max_page_count = 1000000")


def _acks(h: Harness) -> list[tuple[object, ...]]:
    return [t for t in h.trace if t[0] == "reply"]


def test_master_withholds_acks_while_the_disk_refuses_and_retries(master1: Harness) -> None:
    h = master1
    h.open()
    _fill(h)
    h.message(CP, "0", 1, seq=7, done=4, checkpoint={"pad": "x" * 50_000}, has_checkpoint=True)
    h.settle()
    h.wait(2.0)
    assert _acks(h) == []  # not saved: not acknowledged
    assert not [a for a in h.actions() if a[0] == "signal"]
    _free(h)
    h.wait(2.5)  # the next retry commits what was staged, then acknowledges it
    assert _acks(h) == [("reply", "ack", "0", 1, 7)]
    assert h.row(0)["checkpoint_done"] == 4
    assert any("writing again" in e for e in h.view.events), h.view.events
    assert not any("No space left" in e for e in h.view.events)
    h.exit(0, 0)
    assert h.close() == 0


def test_master_stops_the_run_cleanly_when_the_disk_stays_full(master1: Harness) -> None:
    h = master1
    h.open()
    _fill(h)
    h.message(CP, "0", 1, seq=7, done=4, checkpoint={"pad": "x" * 50_000}, has_checkpoint=True)
    h.settle()
    h.wait(12.0)
    lines = [e for e in h.view.events if "No space left on device" in e]
    assert len(lines) == 1, h.view.events
    assert lines[0].startswith(h.db) and f"orch resume {h.master.run_id}" in lines[0]
    assert ("signal", "0", 1, "SIGTERM") in h.actions()
    h.exit(0, -15)
    assert h.master.finished
    assert h.close() == RET_FAILED
    assert _acks(h) == []
    assert len([e for e in h.view.events if "No space left on device" in e]) == 1
