"""The ready queue: pending shards in the order they start.

Shards start in shard order; one that goes back to pending (a restart after
an exit, the end of a backoff) joins the back of the queue. A shard a user
restarted, or one a scale-down stopped, means "a new attempt now": it goes to
the front once it is pending again. The master owns the queue and dispatches
from it while a slot is free.
"""

from __future__ import annotations

from collections import deque

from orchestrator.shard import ShardRun

__all__ = ["ReadyQueue"]


class ReadyQueue:
    def __init__(self) -> None:
        self._queue: deque[ShardRun] = deque()
        #: Shards to put at the front when they are next pending.
        self._first: set[ShardRun] = set()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def first_next_time(self, run: ShardRun) -> None:
        """Put ``run`` at the front when it is next pending."""
        self._first.add(run)

    def forget(self, run: ShardRun) -> None:
        """``run`` was stopped: it takes no place at the front any more."""
        self._first.discard(run)

    def push(self, run: ShardRun) -> None:
        """``run`` is pending: queue it (at the front when it was marked so)."""
        if run in self._first:
            self._first.discard(run)
            self._queue.appendleft(run)
        else:
            self._queue.append(run)

    def pop(self) -> ShardRun:
        return self._queue.popleft()

    def clear(self) -> None:
        self._queue.clear()
