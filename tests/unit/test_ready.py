"""The ready queue: dispatch order of pending shards (by index)."""

from __future__ import annotations

import pytest

from orchestrator import ready as ready_module
from orchestrator.ready import ReadyQueue


def drain(queue: ReadyQueue) -> list[int]:
    out = []
    while queue:
        out.append(queue.pop())
    return out


def test_shard_order_then_the_back_and_marked_ones_first() -> None:
    q = ReadyQueue()
    for i in range(5):
        q.push(i)
    assert q.pop() == 0 and q.pop() == 1
    q.push(0)  # back to pending after an exit: the back of the queue
    q.first_next_time(1)
    q.first_next_time(4)
    q.push(1)  # a restart: the front
    q.push(4)
    assert len(q) == 6
    assert drain(q) == [4, 1, 2, 3, 4, 0]  # 4 queued twice: the master skips a non-pending one
    with pytest.raises(IndexError):
        q.pop()


def test_forget_and_clear() -> None:
    q = ReadyQueue()
    q.first_next_time(7)
    q.forget(7)  # stopped: no place at the front any more
    q.push(3)
    q.push(7)
    assert drain(q) == [3, 7]
    q.push(1)
    q.first_next_time(2)
    q.push(2)
    q.clear()
    assert not q and len(q) == 0
    q.push(9)
    assert drain(q) == [9]


def test_a_long_queue_keeps_its_order_across_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ready_module, "_COMPACT", 8)
    q = ReadyQueue()
    got: list[int] = []
    for i in range(100):
        q.push(i)
        if i % 3 == 2:
            got.append(q.pop())
    assert len(q) == 100 - len(got)
    assert got + drain(q) == list(range(100))
    assert len(q._queue) < 100  # popped entries were dropped from the array
