"""The run's figures: shards by state, how many hold a slot or are unfinished, items
done, and how the run ends (its state and exit code).

The master keeps one ``Tally`` up to date with every shard's state change, so
``orch status``, the live view and the end of the run read counts without
walking every shard.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterable

from orchestrator.errors import RET_FAILED, RET_INTERRUPTED, RET_OK
from orchestrator.lifecycle import State
from orchestrator.shard import ShardRun

__all__ = ["Tally", "items"]


class Tally:
    def __init__(self) -> None:
        self.by_state: Counter[str] = Counter()
        self.running = 0  # shards holding a slot (running or stopping)
        self.unfinished = 0

    def add(self, state: State) -> None:
        """A shard taken over from the store, in ``state``."""
        self.by_state[state.value] += 1
        if not state.terminal:
            self.unfinished += 1

    def change(self, old: State, new: State) -> None:
        """A shard went from ``old`` to ``new``."""
        self.by_state[old.value] -= 1
        self.by_state[new.value] += 1
        if new.holds_slot and not old.holds_slot:
            self.running += 1
        elif old.holds_slot and not new.holds_slot:
            self.running -= 1
        if new.terminal and not old.terminal:
            self.unfinished -= 1
        elif old.terminal and not new.terminal:
            self.unfinished += 1

    @property
    def finished(self) -> bool:
        return self.unfinished == 0 and self.running == 0

    def counts(self) -> dict[str, int]:
        """Shards by state (states with none left out)."""
        return {state: n for state, n in self.by_state.items() if n}

    def run_state(self, *, stopped: bool) -> str:
        """The run's state; ``stopped``: by a signal or a disk that refused its state."""
        if not self.finished:
            return "running"
        counts = self.counts()
        if stopped:
            return "stopped"
        if counts.get("failed"):
            return "failed"
        if counts.get("stopped"):
            return "stopped"
        return "done"

    def exit_code(self, *, interrupted: int | None, store_failed: bool) -> int:
        """The run's exit code, given the signal that stopped it (if any)."""
        if store_failed:
            return RET_FAILED
        if interrupted == signal.SIGINT:
            return RET_INTERRUPTED
        if interrupted is not None:
            return 128 + interrupted
        return RET_OK if self.run_state(stopped=False) == "done" else RET_FAILED


def items(runs: Iterable[ShardRun]) -> tuple[int, int | None]:
    """(items done, items in all) over ``runs``; None while a total is unknown."""
    done, total, known = 0, 0, True
    for run in runs:
        done += run.done or 0
        if run.total is None:
            known = known and run.life.state.terminal
        else:
            total += run.total
    return done, (total if known and total else None)
