"""The ready queue: pending shards in the order they start.

Shards start in shard order; one that goes back to pending (a restart after
an exit, the end of a backoff) joins the back of the queue. A shard a user
restarted, or one a scale-down stopped, means "a new attempt now": it goes to
the front once it is pending again. The master owns the queue and dispatches
from it while a slot is free.

The queue holds shard indexes, not ``ShardRun``s: 100,000 pending shards are
four bytes each in one array (a shard's run is made when it is dispatched, see
``shard.ShardRuns``). An index may be queued more than once (a shard stopped,
then pending again); the master skips a popped shard that is not pending.
"""

from __future__ import annotations

from array import array
from collections import deque

__all__ = ["ReadyQueue"]

#: Popped entries at the head of the array are dropped once there are this many.
_COMPACT = 4096


class ReadyQueue:
    def __init__(self) -> None:
        #: Shards put at the front (newest first).
        self._front: deque[int] = deque()
        #: The rest, in order, from ``_head`` on.
        self._queue = array("i")
        self._head = 0
        #: Shards to put at the front when they are next pending.
        self._first: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self._front) or self._head < len(self._queue)

    def __len__(self) -> int:
        return len(self._front) + len(self._queue) - self._head

    def first_next_time(self, index: int) -> None:
        """Put shard ``index`` at the front when it is next pending."""
        self._first.add(index)

    def forget(self, index: int) -> None:
        """Shard ``index`` was stopped: it takes no place at the front any more."""
        self._first.discard(index)

    def push(self, index: int) -> None:
        """Shard ``index`` is pending: queue it (at the front when it was marked so)."""
        if index in self._first:
            self._first.discard(index)
            self._front.appendleft(index)
        else:
            self._queue.append(index)

    def pop(self) -> int:
        if self._front:
            return self._front.popleft()
        queue, head = self._queue, self._head
        if head >= len(queue):
            raise IndexError("pop from an empty ReadyQueue")
        index = queue[head]
        head += 1
        if head >= _COMPACT and head * 2 >= len(queue):
            del queue[:head]
            head = 0
        self._head = head
        return index

    def clear(self) -> None:
        self._front.clear()
        del self._queue[:]
        self._head = 0
