"""What the master does when the disk refuses the run's state.

A commit the disk refuses (full, I/O error) keeps everything staged in the
store (``StoreUnwritable``). ``StoreRetry`` retries it with a doubling delay;
when the disk still refuses after ``STORE_RETRY_S`` it gives up: one line
says where and why and how to finish the run, and every shard is stopped,
since a run whose progress and checkpoints cannot be saved must not go on.
Nothing is acknowledged to a shard meanwhile (the master sends acks only
after a commit that went through).
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.loop import Loop
from orchestrator.ports import Reporter
from orchestrator.store import StoreUnwritable

__all__ = ["STORE_RETRY_DELAYS_S", "STORE_RETRY_S", "StoreRetry"]

#: How long state writes the disk refuses are retried before the run is stopped.
STORE_RETRY_S = 10.0
#: Delay between those retries: doubling from the first, up to the last.
STORE_RETRY_DELAYS_S = (0.1, 2.0)
#: The loop timer that retries the commit; while it is set, commits wait for it.
TIMER = "store-retry"


class StoreRetry:
    def __init__(
        self,
        *,
        loop: Loop,
        view: Reporter,
        run_id: str,
        commit: Callable[[], None],
        stop: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._view = view
        self._run_id = run_id
        self._commit = commit
        self._stop = stop
        #: Set once the run gave up on its disk: the run stops and ends failed.
        self.error: str | None = None
        self._failing_since: float | None = None
        self._delay = STORE_RETRY_DELAYS_S[0]

    @property
    def waiting(self) -> bool:
        """True while a retry is due: a commit now would only be refused again."""
        return TIMER in self._loop.timers

    def refused(self, exc: StoreUnwritable) -> None:
        """The disk refused a commit: retry it later (everything staged is kept), and give
        up when it still refuses after STORE_RETRY_S."""
        now = self._loop.clock()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= STORE_RETRY_S and self.error is None:
            self.give_up(exc)
        delay, self._delay = self._delay, min(self._delay * 2, STORE_RETRY_DELAYS_S[1])
        self._loop.timers.set(TIMER, now + delay, self._commit)

    def committed(self, path: str) -> None:
        """A commit went through: after a failure, say the disk is writing again."""
        if self._failing_since is None:
            return
        self._failing_since = None
        self._delay = STORE_RETRY_DELAYS_S[0]
        if self.error is None:
            self._view.event(f"{path}: writing again")

    def give_up(self, exc: StoreUnwritable) -> None:
        """Stop every shard, once; one line says where and why, and how to finish the run."""
        if self.error is not None:
            return
        self.error = exc.reason
        self._view.event(
            f"{exc.path}: {exc.reason}; stopping the run "
            f"(free some space, then 'orch resume {self._run_id}')"
        )
        self._stop()
