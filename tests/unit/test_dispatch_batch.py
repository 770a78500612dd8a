"""A dispatch batch spawns first and settles its attempts after its last spawn.

Through the real ``Master`` with the fake ports of test_master.py: every
attempt of a batch is started before any of them is recorded, announced to
the guardian or given its logs, and all of that is done before the master
returns to its loop, so nothing it hears later finds an attempt half-known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_master import Harness

from orchestrator import lifecycle as lc
from orchestrator.backends import Stream


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kwargs: Any) -> Harness:
        made.append(Harness(tmp_path / f"h{len(made)}", **kwargs))
        return made[-1]

    yield factory
    for h in made:
        if not h.closed:
            h.close()
        h.store.close()


def _spy_on_settling(h: Harness) -> list[tuple[str, int]]:
    """(what, how many attempts the backend had started at that moment), in call order."""
    seen: list[tuple[str, int]] = []
    watch, started = h.guard.watch, h.store.attempt_started

    def spy_watch(pgid: int) -> None:
        seen.append(("guardian", len(h.backend.specs)))
        watch(pgid)

    def spy_started(idx: int, attempt: int, **kw: Any) -> None:
        seen.append(("store", len(h.backend.specs)))
        started(idx, attempt, **kw)

    h.guard.watch = spy_watch  # type: ignore[method-assign]
    h.store.attempt_started = spy_started  # type: ignore[method-assign]
    return seen


def test_a_batch_spawns_every_attempt_before_settling_any(make: Any) -> None:
    h: Harness = make(n=4, jobs=3)
    seen = _spy_on_settling(h)
    h.master.open()  # the first batch, and nothing of the loop yet
    assert [s.shard_id for s in h.backend.specs] == ["0", "1", "2"]
    assert seen == [("guardian", 3), ("store", 3)] * 3
    # ... and every one of them is settled before open() returns to the loop.
    assert h.guard.log == ["+1001", "+1002", "+1003"]
    for idx in range(3):
        run = h.master.shard_runs[idx]
        assert run.handle is not None and run.logs is not None and run.watch is not None
        (att,) = h.store.attempts(idx)
        assert (att["attempt"], att["pid"], att["started_at"]) == (1, 1001 + idx, 1_700_000_000.0)
        assert h.row(idx)["pid"] == 1001 + idx
    assert h.store.attempts(3) == []
    h.settle()
    assert h.row(0)["pid_create_time"] == 1001.5  # stamped and committed in the idle pass


def test_an_attempt_heard_from_before_its_batch_settled_is_settled_first(make: Any) -> None:
    """Spawns come only from the master's dispatch loop, which settles its batch; if one
    ever came from elsewhere, its output or exit would still find its start recorded."""
    h: Harness = make(n=3, jobs=1)
    h.open()
    master = h.master
    for idx, event in ((1, "output"), (2, "exit")):
        run = master.shard_runs[idx]
        master.ready.forget(run)
        master.apply(run, lc.Start())  # a spawn outside the dispatch loop: not settled
        assert h.store.attempts(idx) == [] and run.logs is None
        if event == "output":
            h.backend.output(idx, Stream.STDOUT, b"hello\n")
            assert run.logs is not None
        else:
            h.backend.exit(idx, 0)
            (att,) = h.store.attempts(idx)
            assert att["started_at"] is not None and att["exit_code"] == 0
        assert f"+{1001 + idx}" in h.guard.log


def test_a_failed_spawn_in_a_batch_leaves_the_others_settled(make: Any) -> None:
    from orchestrator.errors import SpawnError

    h: Harness = make(n=3)
    h.backend.fail[1] = SpawnError("executable not found: 'nope'")
    h.open()
    assert [s.shard_id for s in h.backend.specs] == ["0", "2"]
    assert h.row(1)["state"] == "failed"
    (failed,) = h.store.attempts(1)
    assert failed["pid"] is None and failed["reason"].startswith("cannot start")
    for idx in (0, 2):
        assert h.row(idx)["state"] == "running" and h.row(idx)["pid"] is not None
    assert sorted(h.guard.log) == ["+1001", "+1002"]
