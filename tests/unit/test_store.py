"""Unit tests for the run's state database (real SQLite files in tmp_path)."""

from __future__ import annotations

import enum
import os
import sqlite3
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest

from orchestrator.errors import OrchError
from orchestrator.store import SCHEMA_VERSION, RunRow, Store, StoreError

TASK = {"argv": ["crawl", "{merchant}"], "restart": "on-failure"}


def run_row(shard_count: int = 3) -> RunRow:
    return RunRow(
        id="20240601-abc",
        name="crawl",
        task_json=TASK,
        source="merchants.csv",
        shard_count=shard_count,
        started_at=1_700_000_000.5,
        jobs=4,
    )


def shard_list(n: int) -> Iterator[tuple[str, dict[str, Any], int]]:
    return ((f"s{i}", {"merchant": f"m{i}", "i": i}, i + 2) for i in range(n))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    s = Store.create(db, run_row(), shard_list(3))
    yield s
    s.close()


def reader(db: str) -> Store:
    return Store.open(db, readonly=True)


# --- create -----------------------------------------------------------------


def test_create_records_run_and_shards(store: Store, db: str) -> None:
    run = store.run()
    assert run["id"] == "20240601-abc"
    assert run["name"] == "crawl"
    assert run["task_json"] == TASK
    assert run["source"] == "merchants.csv"
    assert run["shard_count"] == 3
    assert run["state"] == "pending"
    assert run["started_at"] == 1_700_000_000.5
    assert run["jobs"] == 4
    assert run["exit_code"] is None and run["ended_at"] is None and run["master_pid"] is None
    shards = store.shards()
    assert [s["idx"] for s in shards] == [0, 1, 2]
    assert [s["id"] for s in shards] == ["s0", "s1", "s2"]
    assert shards[1]["record"] == {"merchant": "m1", "i": 1}
    assert shards[1]["line"] == 3
    assert all(s["state"] == "pending" and s["attempts"] == 0 for s in shards)
    assert shards[0]["checkpoint"] is None
    assert not store.dirty
    # committed: a separate reader sees it all
    with_reader = reader(db)
    assert with_reader.counts() == {"pending": 3}
    with_reader.close()


def test_create_uses_wal_schema_version_and_private_file(store: Store, db: str) -> None:
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert stat.S_IMODE(os.stat(db).st_mode) & 0o077 == 0


def test_create_accepts_any_mapping_as_record(db: str) -> None:
    rows: list[tuple[str, Mapping[str, Any], int]] = [("a", MappingProxyType({"x": 1}), 1)]
    with_store = Store.create(db, run_row(1), rows)
    assert with_store.shard("a") is not None
    assert with_store.shard("a")["record"] == {"x": 1}  # type: ignore[index]
    with_store.close()


def test_paths_with_uri_special_characters(tmp_path: Path) -> None:
    odd = tmp_path / "a b#c?d%20e"
    odd.mkdir()
    path = str(odd / "state.db")
    Store.create(path, run_row(), shard_list(3)).close()
    for readonly in (False, True):
        opened = Store.open(path, readonly=readonly)
        assert opened.counts() == {"pending": 3}
        opened.close()
    assert all(name.startswith("state.db") for name in os.listdir(odd))
    assert os.listdir(tmp_path) == [odd.name]  # nothing landed at a mis-decoded path


def test_create_refuses_existing_file(store: Store, db: str) -> None:
    with pytest.raises(StoreError, match="already exists"):
        Store.create(db, run_row(), shard_list(3))
    assert store.counts() == {"pending": 3}  # the existing run is untouched


def test_create_with_duplicate_shard_id_leaves_no_file(db: str) -> None:
    rows: list[tuple[str, dict[str, Any], int]] = [("a", {}, 1), ("a", {}, 2)]
    with pytest.raises(StoreError) as info:
        Store.create(db, run_row(2), rows)
    assert "\n" not in str(info.value)
    assert not os.path.exists(db)


def test_create_with_wrong_shard_count_leaves_no_file(db: str) -> None:
    with pytest.raises(ValueError, match="shard_count"):
        Store.create(db, run_row(5), shard_list(3))
    assert not os.path.exists(db)


def test_create_100k_shards(db: str) -> None:
    n = 100_000
    with_store = Store.create(db, run_row(n), shard_list(n))
    with_store.close()
    r = reader(db)
    assert r.counts() == {"pending": n}
    last = r.shard(n - 1)
    assert last is not None and last["id"] == f"s{n - 1}" and last["line"] == n + 1
    assert r.shard(f"s{n // 2}")["idx"] == n // 2  # type: ignore[index]
    assert len(r.shards()) == n
    r.close()


# --- open -------------------------------------------------------------------


def test_open_missing_file(db: str) -> None:
    for readonly in (False, True):
        with pytest.raises(StoreError, match="no run database") as info:
            Store.open(db, readonly=readonly)
        assert isinstance(info.value, OrchError) and "\n" not in str(info.value)
    assert not os.path.exists(db)  # opening never creates a database


def test_open_garbage_file(db: str) -> None:
    Path(db).write_bytes(b"this is not sqlite at all\n" * 200)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="state.db") as info:
            Store.open(db, readonly=readonly)
        assert "\n" not in str(info.value)


def test_open_sqlite_file_that_is_not_a_run_db(db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not an orch run database"):
            Store.open(db, readonly=readonly)


def test_open_refuses_newer_schema_version(store: Store, db: str) -> None:
    store.close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
            Store.open(db, readonly=readonly)


def test_open_as_writer_resumes(store: Store, db: str) -> None:
    store.set_shard(0, state="done")
    store.commit()
    store.close()
    again = Store.open(db)
    assert again.shard(0)["state"] == "done"  # type: ignore[index]
    again.set_shard(1, state="done")
    again.commit()
    again.close()
    r = reader(db)
    assert r.counts() == {"done": 2, "pending": 1}
    r.close()


def test_reader_works_while_writer_live(store: Store, db: str) -> None:
    store.set_run(state="running")
    store.commit()
    r = reader(db)
    assert r.run()["state"] == "running"
    r.close()


def test_reader_works_after_writer_is_gone(store: Store, db: str) -> None:
    store.set_run(state="done")
    store.commit()
    store.close()
    assert not os.path.exists(db + "-wal")  # a clean close removed the WAL
    r = reader(db)
    assert r.run()["state"] == "done"
    r.close()
    r = reader(db)  # and again, with the -wal/-shm the first reader left behind
    assert r.counts() == {"pending": 3}
    r.close()


def test_readonly_store_refuses_writes(store: Store, db: str) -> None:
    r = reader(db)
    with pytest.raises(RuntimeError, match="read-only"):
        r.set_shard(0, state="done")
    with pytest.raises(RuntimeError, match="read-only"):
        r.add_counter("x", 1)
    assert not r.dirty
    r.commit()  # nothing staged: a no-op
    r.close()


# --- writer -----------------------------------------------------------------


def test_set_run(store: Store) -> None:
    store.set_run(state="running", master_pid=123, master_create_time=5.5, endpoint="ipc://x")
    store.set_run(control="ipc://c", jobs=8, task_json={"argv": ["y"]})
    store.commit()
    run = store.run()
    assert (run["state"], run["master_pid"], run["master_create_time"]) == ("running", 123, 5.5)
    assert (run["endpoint"], run["control"], run["jobs"]) == ("ipc://x", "ipc://c", 8)
    assert run["task_json"] == {"argv": ["y"]}
    store.set_run(exit_code=1, ended_at=9.0)
    store.commit()
    assert (store.run()["exit_code"], store.run()["ended_at"]) == (1, 9.0)


@pytest.mark.parametrize("column", ["id", "nope", "idx"])
def test_set_run_rejects_unknown_or_fixed_columns(store: Store, column: str) -> None:
    with pytest.raises(ValueError, match=column):
        store.set_run(**{column: 1})
    assert not store.dirty


def test_set_shard(store: Store) -> None:
    store.set_shard(
        1,
        state="running",
        attempts=2,
        pid=10,
        pgid=10,
        pid_create_time=1.25,
        started_at=2.0,
        done=5,
        total=50,
        heartbeat_at=3.0,
        updated_at=3.5,
        last_error="boom",
    )
    store.set_shard(2, state="failed", exit_code=3, signal=9, reason="gave-up", ended_at=4.0)
    store.commit()
    s1 = store.shard(1)
    assert s1 is not None
    assert (s1["state"], s1["attempts"], s1["pid"], s1["pgid"]) == ("running", 2, 10, 10)
    assert (s1["pid_create_time"], s1["started_at"], s1["done"], s1["total"]) == (1.25, 2.0, 5, 50)
    assert (s1["heartbeat_at"], s1["updated_at"], s1["last_error"]) == (3.0, 3.5, "boom")
    s2 = store.shard("s2")
    assert s2 is not None
    assert (s2["exit_code"], s2["signal"], s2["reason"], s2["ended_at"]) == (3, 9, "gave-up", 4.0)
    assert store.shard(0)["state"] == "pending"  # type: ignore[index]


def test_set_shard_checkpoint_is_encoded_and_decoded(store: Store, db: str) -> None:
    store.set_shard(
        0, checkpoint={"cursor": "abc", "n": [1, 2]}, checkpoint_done=7, checkpoint_at=1.0
    )
    store.set_shard(1, checkpoint=b'{"raw":true}')  # already-encoded JSON passes through
    store.set_shard(2, checkpoint=41)
    store.commit()
    r = reader(db)
    s0 = r.shard(0)
    assert s0 is not None
    assert s0["checkpoint"] == {"cursor": "abc", "n": [1, 2]}
    assert (s0["checkpoint_done"], s0["checkpoint_at"]) == (7, 1.0)
    assert r.shard(1)["checkpoint"] == {"raw": True}  # type: ignore[index]
    assert r.shard(2)["checkpoint"] == 41  # type: ignore[index]
    r.close()
    store.set_shard(0, checkpoint=None)
    store.commit()
    assert store.shard(0)["checkpoint"] is None  # type: ignore[index]
    raw = sqlite3.connect(db).execute("SELECT checkpoint FROM shards WHERE idx = 2").fetchone()
    assert orjson.loads(raw[0]) == 41


def test_set_shard_rejects_invalid_encoded_checkpoint(store: Store) -> None:
    with pytest.raises(ValueError):
        store.set_shard(0, checkpoint=b"{not json")


@pytest.mark.parametrize("column", ["id", "record", "line", "nope"])
def test_set_shard_rejects_unknown_or_fixed_columns(store: Store, column: str) -> None:
    with pytest.raises(ValueError, match=column):
        store.set_shard(0, **{column: 1})
    assert not store.dirty


def test_set_shard_unknown_idx(store: Store) -> None:
    with pytest.raises(ValueError, match="idx 99"):
        store.set_shard(99, state="done")


def test_set_shard_accepts_str_enum_states(store: Store) -> None:
    class State(enum.StrEnum):
        RUNNING = "running"

    store.set_shard(0, state=State.RUNNING)
    store.commit()
    assert store.counts() == {"pending": 2, "running": 1}
    assert store.shards(states=[State.RUNNING])[0]["idx"] == 0


def test_attempts(store: Store, db: str) -> None:
    store.attempt_started(1, 1, pid=100, pgid=100, create_time=1.5, started_at=2.0)
    store.attempt_ended(1, 1, ended_at=3.0, exit_code=None, signal=9, reason="hung")
    store.attempt_started(1, 2, pid=None, pgid=None, create_time=None, started_at=4.0)
    store.commit()
    r = reader(db)
    first, second = r.attempts(1)
    assert first == {
        "shard_idx": 1,
        "attempt": 1,
        "pid": 100,
        "pgid": 100,
        "create_time": 1.5,
        "started_at": 2.0,
        "ended_at": 3.0,
        "exit_code": None,
        "signal": 9,
        "reason": "hung",
    }
    assert second["attempt"] == 2 and second["ended_at"] is None and second["pid"] is None
    assert r.attempts(0) == []
    r.close()


def test_attempt_started_twice_is_an_error(store: Store) -> None:
    store.attempt_started(0, 1, pid=1, pgid=1, create_time=1.0, started_at=1.0)
    with pytest.raises(sqlite3.IntegrityError):
        store.attempt_started(0, 1, pid=2, pgid=2, create_time=1.0, started_at=1.0)
    store.commit()  # the failed statement did not poison the transaction
    assert [a["pid"] for a in store.attempts(0)] == [1]


def test_attempt_ended_without_start_is_an_error(store: Store) -> None:
    with pytest.raises(ValueError, match="attempt 3"):
        store.attempt_ended(0, 3, ended_at=1.0, exit_code=0, signal=None, reason=None)


def test_counters(store: Store, db: str) -> None:
    assert store.counters() == {}
    store.add_counter("dropped_garbage", 1)
    store.add_counter("dropped_garbage", 2)
    store.add_counter("dropped_stale", 5)
    store.commit()
    store.add_counter("dropped_stale", -1)
    store.commit()
    r = reader(db)
    assert r.counters() == {"dropped_garbage": 3, "dropped_stale": 4}
    r.close()


def test_dirty_and_commit(store: Store) -> None:
    assert not store.dirty
    store.commit()  # nothing staged: a no-op
    store.set_shard(0, done=1)
    assert store.dirty
    store.set_shard(0, done=2)
    store.commit()
    assert not store.dirty
    store.set_run(state="running")
    assert store.dirty
    store.commit()
    store.add_counter("x", 1)
    assert store.dirty
    store.commit()
    store.attempt_started(0, 1, pid=1, pgid=1, create_time=1.0, started_at=1.0)
    assert store.dirty
    store.commit()
    store.set_shard(0)  # nothing to set: nothing staged
    assert not store.dirty


def test_close_without_commit_discards_staged_changes(store: Store, db: str) -> None:
    store.set_shard(0, state="done")
    store.add_counter("x", 1)
    assert store.shard(0)["state"] == "done"  # type: ignore[index]  # writer sees its own
    store.close()
    r = reader(db)
    assert r.shard(0)["state"] == "pending"  # type: ignore[index]
    assert r.counters() == {}
    r.close()


def test_reader_sees_last_committed_state_during_open_transaction(store: Store, db: str) -> None:
    store.set_shard(0, state="done", checkpoint={"pos": 1})
    store.commit()
    r = reader(db)
    # the writer stages a transaction and keeps it open
    store.set_shard(0, checkpoint={"pos": 2})
    store.set_shard(1, state="done", done=5)
    store.add_counter("done", 2)
    assert store.dirty
    # an existing reader and a newly opened one both see the last commit, unblocked
    late = reader(db)
    for view in (r, late):
        assert view.counts() == {"done": 1, "pending": 2}
        assert view.shard(0)["checkpoint"] == {"pos": 1}  # type: ignore[index]
        assert view.counters() == {}
        assert view.progress_totals() == (0, None)
    store.commit()
    for view in (r, late):
        assert view.counts() == {"done": 2, "pending": 1}
        assert view.shard(0)["checkpoint"] == {"pos": 2}  # type: ignore[index]
        assert view.counters() == {"done": 2}
        assert view.progress_totals() == (5, None)
    r.close()
    late.close()


# --- readers ----------------------------------------------------------------


def test_shards_filtered_by_state(db: str) -> None:
    with_store = Store.create(db, run_row(6), shard_list(6))
    for idx, state in [(5, "done"), (1, "done"), (3, "failed"), (4, "running")]:
        with_store.set_shard(idx, state=state)
    with_store.commit()
    assert [s["idx"] for s in with_store.shards(states={"done"})] == [1, 5]
    assert [s["idx"] for s in with_store.shards(states=["failed", "done"])] == [1, 3, 5]
    assert [s["idx"] for s in with_store.shards(states=("pending",))] == [0, 2]
    assert with_store.shards(states=[]) == []
    assert with_store.shards(states=["nope"]) == []
    assert [s["idx"] for s in with_store.shards()] == list(range(6))
    with_store.close()


def test_shard_by_id_or_idx(store: Store) -> None:
    by_id = store.shard("s2")
    by_idx = store.shard(2)
    assert by_id is not None and by_id == by_idx and by_id["idx"] == 2
    assert store.shard("missing") is None
    assert store.shard(3) is None
    assert store.shard("2") is None  # a str is always an id, never an index


def test_counts(db: str) -> None:
    with_store = Store.create(db, run_row(5), shard_list(5))
    with_store.set_shard(0, state="done")
    with_store.set_shard(1, state="done")
    with_store.set_shard(2, state="failed")
    with_store.commit()
    assert with_store.counts() == {"done": 2, "failed": 1, "pending": 2}
    with_store.close()


def test_progress_totals(db: str) -> None:
    with_store = Store.create(db, run_row(4), shard_list(4))
    assert with_store.progress_totals() == (0, None)
    with_store.set_shard(0, state="done", done=10, total=10)
    with_store.set_shard(1, state="running", done=3, total=20)
    # Shards 2 and 3 are pending without a total: the run's total is unknown, not 30.
    assert with_store.progress_totals() == (13, None)
    with_store.set_shard(3, state="done")  # finished without ever reporting a total
    with_store.set_shard(2, state="backoff", done=4)  # unfinished, no total yet
    assert with_store.progress_totals() == (17, None)
    with_store.set_shard(2, state="failed")  # finished: its missing total no longer matters
    assert with_store.progress_totals() == (17, 30)
    with_store.commit()
    r = reader(db)
    assert r.progress_totals() == (17, 30)
    r.close()
    with_store.close()


def test_rows_are_json_friendly(store: Store) -> None:
    store.set_shard(0, checkpoint={"a": 1})
    store.attempt_started(0, 1, pid=1, pgid=1, create_time=1.0, started_at=1.0)
    store.add_counter("x", 1)
    store.commit()
    payload = {
        "run": store.run(),
        "shards": store.shards(),
        "attempts": store.attempts(0),
        "counts": store.counts(),
        "counters": store.counters(),
        "totals": store.progress_totals(),
    }
    assert orjson.loads(orjson.dumps(payload))["shards"][0]["checkpoint"] == {"a": 1}


def test_set_progress_many_updates_each_row_in_one_transaction(db: str) -> None:
    store = Store.create(db, run_row(3), shard_list(3))
    store.set_progress_many([(5, 10, 100.0, 4096, 0), (7, None, 101.0, None, 2)])
    r = reader(db)
    assert [s["done"] for s in r.shards()] == [None, None, None]  # staged, not committed
    store.commit()
    rows = {s["idx"]: s for s in r.shards()}
    assert (rows[0]["done"], rows[0]["total"], rows[0]["heartbeat_at"], rows[0]["rss_bytes"]) == (
        5, 10, 100.0, 4096)
    assert (rows[2]["done"], rows[2]["total"]) == (7, None)
    assert rows[1]["done"] is None
    r.close()
    store.close()
