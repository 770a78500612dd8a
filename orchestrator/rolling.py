"""A rolling restart: every running shard restarted, at most K at a time.

``orch restart --rolling K`` restarts K running shards; each time one of them
is running again (or has ended), the next one is restarted, until none is
left. A shard that ended or was stopped before its turn is skipped. The master
owns one ``RollingRestart``, tells it of every state change and lets it call
back into ``restart``; it holds no other state of the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from orchestrator.lifecycle import State
from orchestrator.shard import ShardRun

__all__ = ["RollingRestart"]


class RollingRestart:
    def __init__(self, restart: Callable[[ShardRun], None]) -> None:
        self._restart = restart
        #: Shards still to restart, and those restarted that are not running yet.
        self._todo: deque[ShardRun] = deque()
        self._out: set[ShardRun] = set()
        self._k = 0

    def begin(self, runs: Iterable[ShardRun], k: int) -> None:
        """Restart ``runs`` at most ``k`` at a time (a new rolling restart replaces one
        under way)."""
        self._todo = deque(runs)
        self._out.clear()
        self._k = k
        self.roll()

    def roll(self) -> None:
        """Restart the next shards while fewer than K restarted ones are not back yet."""
        while self._todo and len(self._out) < self._k:
            run = self._todo.popleft()
            if run.life.state is not State.RUNNING:
                continue  # ended or stopped meanwhile: nothing to restart
            self._out.add(run)
            self._restart(run)

    def settled(self, run: ShardRun, state: State) -> bool:
        """``run`` changed to ``state``; True when it freed a place (call ``roll`` next)."""
        if run in self._out and (state is State.RUNNING or state.terminal):
            self._out.discard(run)
            return True
        return False

    def cancel(self) -> None:
        """Restart no more shards (the run is being aborted)."""
        self._todo.clear()
