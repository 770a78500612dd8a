"""The event hub: every run under the home, watched from outside its master.

One asyncio task (``scan``) looks at the home once a second: it notices new
runs, run state changes (a run becoming ``done``, a master dying: ``lost``),
and, for each live run, reads its progress from the store, at most once a
second, into a ``progress`` event with the rate, ETA and a 15-minute
sparkline. A run's files are re-read only when its database changed (the
WAL's size and mtime), so a home with a thousand finished runs costs a
``stat`` each per second.

Each live run also gets a follower thread on its master's event feed (the
PUB socket the control socket hands out), so a shard state change reaches
subscribers within milliseconds, not at the next scan. The thread only
forwards events to the loop (``call_soon_threadsafe``); all hub state is
owned by the loop.

Events carry increasing integer ids. Ids start at the start time in
microseconds, so a client that reconnects with a ``Last-Event-ID`` from an
earlier ``orch serve`` gets a ``reset`` event (refetch everything) rather
than a silent gap; so does one whose id fell out of the ring buffer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.serve import data

#: Progress samples kept per live run: one a second, 15 minutes.
HISTORY_S = 15 * 60
#: The sparkline: one point (the rate) per this many seconds.
SPARK_BUCKET_S = 10
#: How often the hub looks for new runs between full scans while a run is live or
#: starting; with nothing live it only wakes for the full scan (``scan_s``), so an
#: idle ``orch serve`` wakes once a second, not five times.
FAST_TICK_S = 0.2
#: The rate is measured over this window.
RATE_WINDOW_S = 60.0


@dataclass
class Watched:
    """What the hub remembers about one run between scans."""

    facts: data.RunFacts
    stamp: tuple[float, ...] = ()
    follower: threading.Thread | None = None
    #: (time, items done, shards finished), one a second
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY_S))
    last_progress: dict[str, Any] | None = None
    #: shard index -> (done, when it was first seen at that value): progress staleness
    moved: dict[int, tuple[int | None, float]] = field(default_factory=dict)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _stamp(run_dir: data.RunDir) -> tuple[float, ...]:
    out: list[float] = []
    for path in data.db_files(run_dir):
        try:
            st = os.stat(path)
        except OSError:
            out += [0.0, 0.0]
            continue
        out += [st.st_mtime, float(st.st_size)]
    return tuple(out)


class Hub:
    def __init__(
        self,
        home: str,
        *,
        buffer: int = 20_000,
        scan_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.scan_s = scan_s
        self.clock = clock
        self.runs: dict[data.RunDir, Watched] = {}
        self.first_id = int(clock() * 1_000_000)
        self._next_id = self.first_id
        self._events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=buffer)
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.scans = 0
        #: run id -> the end state its master announced (so a scan does not repeat it)
        self._announced: dict[str, str] = {}

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.scan_once)
        self._task = asyncio.create_task(self._scan_forever())

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def _scan_forever(self) -> None:
        """A full scan every ``scan_s``; sooner when a run appears or one is starting.

        While a run is live or starting, every 0.2 s costs one ``stat`` of the runs
        directory, so a new run is followed within a fraction of a second, not at
        the next full scan; with nothing live, a new run is seen by the next full
        scan (at most ``scan_s``).
        """
        root = data.runs_root(self.home)
        last_scan = time.monotonic()
        last_mtime = _mtime(root)
        busy = True
        while not self._closing:
            await asyncio.sleep(FAST_TICK_S if busy else self.scan_s)
            mtime = _mtime(root)
            states = {w.facts.state for w in self.runs.values()}
            starting = "pending" in states
            busy = starting or "running" in states
            due = time.monotonic() - last_scan >= self.scan_s
            if not (due or starting or mtime != last_mtime):
                continue
            last_mtime, last_scan = mtime, time.monotonic()
            try:
                await asyncio.to_thread(self.scan_once)
            except Exception as exc:  # noqa: BLE001 - a bad run dir must not stop the hub
                print(f"orch serve: scan failed: {exc}", flush=True)

    # --- events ------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """Append an event and wake subscribers; loop thread only."""
        self._next_id += 1
        self._events.append((self._next_id, event))
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _post(self, event: dict[str, Any]) -> None:
        """Publish from any thread."""
        loop = self._loop
        if loop is None:
            self.publish(event)
            return
        try:
            loop.call_soon_threadsafe(self.publish, event)
        except RuntimeError:
            pass  # the loop closed: orch serve is stopping

    @property
    def last_id(self) -> int:
        return self._next_id

    def since(self, last_id: int | None) -> list[tuple[int, dict[str, Any]]] | None:
        """Events after ``last_id``; None when some were lost (from another start, or too old)."""
        if last_id is None:
            return []
        if last_id > self._next_id or last_id < self.first_id:
            return None
        if self._events and last_id < self._events[0][0] - 1:
            return None
        out: list[tuple[int, dict[str, Any]]] = []
        for item in reversed(self._events):
            if item[0] <= last_id:
                break
            out.append(item)
        out.reverse()
        return out

    async def wait(self, timeout_s: float) -> None:
        """Until the next event is published, or ``timeout_s``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    # --- scanning (runs in a worker thread; publishes through _post) -------------

    def scan_once(self) -> None:
        self.scans += 1
        now = self.clock()
        seen = set()
        for run_dir in data.run_dirs(self.home):
            seen.add(run_dir)
            w = self.runs.get(run_dir)
            stamp = _stamp(run_dir)
            if w is not None and w.facts.state != "running" and stamp == w.stamp:
                continue  # an ended run whose store did not change
            if w is not None and w.facts.state == "running" and stamp == w.stamp:
                self._check_master(w)
                self._sample(w, now, changed=False)
                continue
            facts = data.run_facts(run_dir)
            if facts is None:
                continue
            if w is None:
                w = self.runs[run_dir] = Watched(facts=facts, stamp=stamp)
                if self.scans > 1:
                    self._post(self._run_event(facts, new=True))
            else:
                old = w.facts.state
                w.facts, w.stamp = facts, stamp
                if facts.state != old and self._announced.get(facts.id) != facts.state:
                    self._post(self._run_event(facts))
            if facts.state == "running":
                self._announced.pop(facts.id, None)
                self._ensure_follower(w)
                self._sample(w, now, changed=True)
            else:
                w.samples.clear()
                w.moved.clear()
                if w.last_progress is not None and w.last_progress.get("rate") is not None:
                    self._progress(w, now, final=True)
        for gone in set(self.runs) - seen:
            del self.runs[gone]

    def _check_master(self, w: Watched) -> None:
        """A master that dies leaves its store untouched: notice it by its pid."""
        if data.master_alive(w.facts):
            return
        facts = data.run_facts(w.facts.run_dir)
        if facts is not None and facts.state != w.facts.state:
            w.facts = facts
            if self._announced.get(facts.id) != facts.state:
                self._post(self._run_event(facts))

    @staticmethod
    def _run_event(facts: data.RunFacts, new: bool = False) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "type": "run",
            "run": facts.id,
            "name": facts.name,
            "state": facts.state,
            "exit_code": facts.exit_code,
        }
        if new:
            ev["new"] = True
        return ev

    def _sample(self, w: Watched, now: float, changed: bool) -> None:
        last = w.samples[-1] if w.samples else None
        if not changed and last is not None:
            w.samples.append((now, last[1], last[2]))
            self._progress(w, now, reread=False)
            return
        try:
            agg = data.aggregates_light(w.facts.run_dir)
            moving = data.running_progress(w.facts.run_dir)
        except data.OrchError:
            return
        finished = sum(agg["counts"].get(s, 0) for s in ("done", "failed", "stopped"))
        w.samples.append((now, agg["items_done"], finished))
        live = set()
        for idx, done, _started in moving:
            live.add(idx)
            prev = w.moved.get(idx)
            if prev is None or prev[0] != done:
                w.moved[idx] = (done, now)
        for idx in set(w.moved) - live:
            del w.moved[idx]
        self._progress(w, now, agg=agg)

    def rate(self, w: Watched, col: int = 1) -> float | None:
        """Items (``col`` 1) or finished shards (``col`` 2) a second, over the last minute."""
        s = w.samples
        if len(s) < 2:
            return None
        t1, d1 = s[-1][0], int(s[-1][col])
        t0, d0 = next(
            ((x[0], x[col]) for x in s if t1 - x[0] <= RATE_WINDOW_S), (s[0][0], s[0][col])
        )
        return data.rate_between(d1, t0, t1, int(d0))

    def spark(self, w: Watched, col: int = 1) -> list[float]:
        """The rate in each 10 s bucket of the last 15 minutes, oldest first."""
        s = list(w.samples)
        if len(s) < 2:
            return []
        out: list[float] = []
        end = s[-1][0]
        buckets = HISTORY_S // SPARK_BUCKET_S
        j = 0
        for b in range(buckets):
            lo = end - (buckets - b) * SPARK_BUCKET_S
            hi = lo + SPARK_BUCKET_S
            while j < len(s) and s[j][0] < lo:
                j += 1
            k = j
            while k < len(s) and s[k][0] < hi:
                k += 1
            if k - j >= 2:
                ta, da, tb, db = s[j][0], s[j][col], s[k - 1][0], s[k - 1][col]
                out.append(data.rate_between(int(db), ta, tb, int(da)) or 0.0)
            elif out:
                out.append(0.0)
        return out

    def _progress(
        self,
        w: Watched,
        now: float,
        agg: dict[str, Any] | None = None,
        reread: bool = True,
        final: bool = False,
    ) -> None:
        prev = w.last_progress
        if agg is None:
            if prev is None:
                return
            agg = {
                k: prev[k] for k in ("counts", "items_done", "items_total", "items_total_estimate")
            }
        total, done = agg["items_total"], agg["items_done"]
        estimate = agg.get("items_total_estimate")
        # Shards that report no items: progress is counted in finished shards.
        col, unit = (1, "items") if estimate is not None or done else (2, "shards")
        rate = None if final else self.rate(w, col)
        if unit == "items":
            eta = data.eta_s(done, estimate, rate)
        else:
            finished = sum(agg["counts"].get(s, 0) for s in ("done", "failed", "stopped"))
            eta = data.eta_s(finished, w.facts.shard_count, rate)
        ev = {
            "type": "progress",
            "run": w.facts.id,
            "counts": agg["counts"],
            "items_done": done,
            "items_total": total,
            "items_total_estimate": estimate,
            "rate": rate,
            "unit": unit,
            "eta_s": eta,
            "spark": [] if final else self.spark(w, col),
        }
        if (
            prev is not None
            and all(prev.get(k) == ev[k] for k in ("counts", "items_done", "items_total"))
            and (prev.get("rate") or 0) == (rate or 0)
        ):
            return
        w.last_progress = ev
        self._post(ev)

    def stats(self, run_id: str) -> dict[str, Any] | None:
        for w in list(self.runs.values()):
            if w.facts.id == run_id:
                return w.last_progress
        return None

    def progress_oldest(self, run_dir: data.RunDir) -> float | None:
        w = self.runs.get(run_dir)
        if w is None or not w.moved:
            return None
        return min(t for _, t in list(w.moved.values()))

    def facts(self) -> list[data.RunFacts]:
        """Every run's facts as of now: read again unless its store says it ended."""
        out = []
        for run_dir in data.run_dirs(self.home):
            w = self.runs.get(run_dir)
            ended = w is not None and w.facts.state in ("done", "failed", "stopped")
            if w is not None and ended and _stamp(run_dir) == w.stamp:
                out.append(w.facts)
                continue
            facts = data.run_facts(run_dir)
            if facts is not None:
                out.append(facts)
        return out

    # --- followers -----------------------------------------------------------------

    def _ensure_follower(self, w: Watched) -> None:
        if w.follower is not None and w.follower.is_alive():
            return
        control = w.facts.control
        if not control:
            return
        t = threading.Thread(
            target=self._follow,
            args=(w.facts.id, control),
            name=f"follow-{w.facts.id}",
            daemon=True,
        )
        w.follower = t
        t.start()

    def _follow(self, run_id: str, control: str) -> None:
        try:
            for ev in data.follow_events(control):
                if self._closing:
                    return
                if "run" in ev and isinstance(ev.get("run"), str):
                    self._announced[run_id] = ev["run"]
                    self._post(
                        {
                            "type": "run",
                            "run": run_id,
                            "state": ev["run"],
                            "exit_code": ev.get("exit_code"),
                        }
                    )
                elif "shard" in ev:
                    self._post(
                        {
                            "type": "shard",
                            "run": run_id,
                            "shard": ev.get("shard"),
                            "index": ev.get("index"),
                            "from": ev.get("from"),
                            "state": ev.get("state"),
                            "attempt": ev.get("attempt"),
                            "reason": ev.get("reason"),
                            "t": ev.get("t"),
                        }
                    )
        except (data.OrchError, OSError, ValueError):
            return  # the master went away; the next scan says lost or ended
        except Exception as exc:  # noqa: BLE001 - a follower must never take serve down
            print(f"orch serve: following {run_id} failed: {exc}", flush=True)
