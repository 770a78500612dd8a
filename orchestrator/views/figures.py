"""The figures every view shows: rate, ETA, counts by state.

Computed here and nowhere else, so ``orch status``, ``--json``, the live
panel, the plain lines and the end-of-run summary agree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

#: Lifecycle order: what the live view lists first.
STATE_ORDER = ("running", "pending", "backoff", "stopping", "done", "failed", "stopped", "lost")
#: Shard states that need a live master; in a lost run they are counted as ``lost``.
UNFINISHED = frozenset({"running", "stopping", "backoff"})


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def counts_text(
    counts: Mapping[str, int], *, sep: str = ", ", lifecycle_order: bool = False
) -> str:
    """``"3 done, 1 failed"``: states by name (or in lifecycle order, zeros left out)."""
    if lifecycle_order:
        parts = [f"{counts[s]} {s}" for s in STATE_ORDER if counts.get(s)]
        return sep.join(parts) or "no shards"
    return sep.join(f"{n} {s}" for s, n in sorted(counts.items()))


def lost_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """The counts of a run whose master is gone: nothing runs, stops or waits to restart
    any more, so those shards are ``lost`` (until ``orch resume``)."""
    out: dict[str, int] = {}
    for state, n in counts.items():
        key = "lost" if state in UNFINISHED else state
        out[key] = out.get(key, 0) + n
    return out


def items_text(done: int, total: int | None) -> str:
    """``"1,200/5,000"``, or ``"1,200"`` when the total is not known."""
    return f"{done:,}" + (f"/{total:,}" if total else "")


def rate_between(
    done: int | None, start: float | None, last: float | None, base: int | None
) -> float | None:
    """Items per second from ``start`` (when ``base`` items were done) to ``last``."""
    if done is None or start is None or last is None or last <= start:
        return None
    return max(0.0, (done - (base or 0)) / (last - start))


def total_rate(rates: Iterable[float | None]) -> float | None:
    """The sum of the known rates; None when none is known."""
    known = [r for r in rates if r is not None]
    return sum(known) if known else None


def eta_s(done: int | None, total: int | None, rate: float | None) -> float | None:
    """Seconds left at ``rate``; None without a positive rate or a total."""
    if not rate or rate <= 0 or total is None or done is None:
        return None
    return max(0.0, (total - done) / rate)


class Rate:
    """Items per second over a sliding window of samples (the live views)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        s = self._samples
        s.append((now, done))
        while len(s) > 2 and now - s[0][0] > self.window_s:
            s.popleft()
        if len(s) < 2 or s[-1][0] <= s[0][0]:
            return None
        return max(0.0, (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0]))
