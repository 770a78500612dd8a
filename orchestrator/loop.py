"""The master's event loop: file descriptors, timers and signals in one thread.

Everything that happens (a child exits, output arrives, a heartbeat lands, a
timer fires, a signal comes in, a control request arrives) is turned into a
callback run by this loop, so one thread owns all shard state and no lock is
ever needed. Signal handlers only record the signal; ``signal.set_wakeup_fd``
on a non-blocking pipe wakes ``select`` at once (a pipe, not a socketpair:
``socket`` is not imported before ``orch run``'s first spawn).
"""

from __future__ import annotations

import heapq
import itertools
import os
import resource
import selectors
import signal
import time
from collections.abc import Callable, Hashable
from typing import Any

Clock = Callable[[], float]
Callback = Callable[[], None]


class Timers:
    """Named one-shot timers on a heap, with lazy cancellation.

    Setting a timer under a key that already has one replaces it; a
    replaced or cancelled entry stays on the heap and is skipped when it
    surfaces, so set and cancel are O(log n) and O(1).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._live: dict[Hashable, tuple[float, int, Callback]] = {}
        self._seq = itertools.count()

    def set(self, key: Hashable, at: float, callback: Callback) -> None:
        seq = next(self._seq)
        self._live[key] = (at, seq, callback)
        heapq.heappush(self._heap, (at, seq, key))

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def at(self, key: Hashable) -> float | None:
        """When the timer under ``key`` fires, or None when there is none."""
        entry = self._live.get(key)
        return entry[0] if entry is not None else None

    def next_at(self) -> float | None:
        heap, live = self._heap, self._live
        while heap:
            at, seq, key = heap[0]
            entry = live.get(key)
            if entry is not None and entry[1] == seq:
                return at
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[Callback]:
        """Remove and return the callbacks of every timer due at ``now``, earliest first."""
        due: list[Callback] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = live.get(key)
            if entry is not None and entry[1] == seq:
                del live[key]
                due.append(entry[2])
        return due

    def __len__(self) -> int:
        return len(self._live)


class Loop:
    """A selector loop with timers, a signal queue and an injected monotonic clock."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        selector: selectors.BaseSelector | None = None,
        os_signals: bool = True,
    ) -> None:
        """``selector`` and ``os_signals=False`` are the seams of a test that drives the loop
        with a fake clock: its selector returns at once (advancing the clock to the timeout),
        and signals arrive only through ``post_signal``."""
        self.clock = clock
        self.timers = Timers()
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._os_signals = os_signals
        self._wake: tuple[int, int] | None = None  # (read end, write end)
        self._signals: list[int] = []
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self._idle: dict[Callback, None] = {}

    # --- file descriptors -------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_when_idle(self, callback: Callback) -> None:
        """Run ``callback`` once at the end of this iteration (group commits, scheduling).

        Asking twice for the same callback in one iteration runs it once.
        """
        self._idle[callback] = None

    # --- signals ----------------------------------------------------------

    def handle_signals(self, handlers: dict[int, Callable[[int], None]]) -> None:
        """Route each signal to its handler, run in the loop, never inside the signal handler."""
        self._signal_handlers.update(handlers)
        if not self._os_signals:
            return
        if self._wake is None:
            wake_r, wake_w = self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector.register(wake_r, selectors.EVENT_READ, self._drain_wakeups)
            self._old_wakeup_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in handlers:
            self._old_handlers[signum] = signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: object) -> None:
        # NO work here: just queue the signal for the loop.
        self._signals.append(signum)

    def post_signal(self, signum: int) -> None:
        """Queue ``signum`` as if the OS had delivered it (what the signal handler does)."""
        self._signals.append(signum)

    def restore_signals(self) -> None:
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)
        self._old_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None

    def _drain_wakeups(self) -> None:
        assert self._wake is not None
        try:
            while os.read(self._wake[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- running ----------------------------------------------------------

    def run_once(self, max_wait_s: float | None = None) -> None:
        """Wait for the next fd, timer or signal, and run what is due."""
        now = self.clock()
        next_at = self.timers.next_at()
        timeout = max_wait_s
        if next_at is not None:
            until = max(0.0, next_at - now)
            timeout = until if timeout is None else min(timeout, until)
        if self._signals or self._idle:
            timeout = 0.0
        for key, _ in self._selector.select(timeout):
            key.data()
        while self._signals:
            signum = self._signals.pop(0)
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)
        for callback in self.timers.pop_due(self.clock()):
            callback()
        # One pass: what the callbacks queue again runs next iteration, after a
        # select(0), so a flood that keeps re-queuing its drain never starves
        # child exits, timers or control requests.
        idle, self._idle = self._idle, {}
        for callback in idle:
            callback()

    def close(self) -> None:
        self.restore_signals()
        self._selector.close()
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each attempt needs two pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
