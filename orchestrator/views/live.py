"""What the foreground ``orch run`` shows while it supervises.

- On a terminal: a compact live view redrawn a few times a second with rich
  (overall progress bar with rate and ETA, shard counts by state, the
  shards that matter: failing, stalled, slowest), and failures printed above
  it as they happen.
- Not a terminal (a log file, CI): a plain line every few seconds and one
  line per failure, nothing else.
- ``--verbose``: child output lines prefixed with the shard id, as well.

The master calls ``tick`` from its loop; views never run threads of their
own, so the master's single thread stays the only one touching shard state.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from orchestrator.backends import Stream
from orchestrator.lifecycle import State
from orchestrator.logs import pick_error
from orchestrator.ports import View
from orchestrator.units import format_duration
from orchestrator.views.figures import Rate, counts_text, eta_s, plural

if TYPE_CHECKING:
    from orchestrator.master import Master
    from orchestrator.shard import ShardRun


def waiting(rt: ShardRun, now: float) -> str:
    """A shard in backoff: when it retries, and why its last attempt ended."""
    life = rt.life
    when = (
        f"retry in {format_duration(max(0.0, life.ready_at - now))}" if life.ready_at else "backoff"
    )
    why = life.reason or "failed"
    if rt.notes:
        why += f": {pick_error(rt.notes)}"
    return f"{when} (attempt {life.attempt}: {why})"


class PlainView(View):
    """Periodic plain lines, for logs and pipes."""

    def __init__(self, out: Any = None, tick_s: float = 5.0, verbose: bool = False) -> None:
        self.out = out or sys.stdout
        self.tick_s = tick_s
        self.verbose = verbose
        self._rate = Rate(30.0)
        self._last = ""

    def _print(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except BrokenPipeError:
            # The reader went away (`orch run ... | head`). The run goes on, and is
            # recorded, without an audience: what is left to print goes to /dev/null.
            fileno = getattr(self.out, "fileno", None)
            if fileno is None:
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fileno())
            os.close(devnull)

    def started(self, master: Master) -> None:
        self._print(
            f"orch: run {master.run_id}: {plural(len(master.shards), 'shard')}, "
            f"jobs {master.jobs}, logs in {master.run_dir}/logs"
        )

    def event(self, text: str) -> None:
        self._print(f"orch: {text}")

    def line(self, shard_id: str, stream: Stream, data: bytes) -> None:
        tag = f"[{shard_id}]" if stream is Stream.STDOUT else f"[{shard_id}!]"
        text = data.decode("utf-8", "replace").rstrip("\n")
        self._print("\n".join(f"{tag} {ln}" for ln in text.split("\n")))

    def status_line(self, master: Master) -> str:
        line = counts_text(master.counts(), lifecycle_order=True)
        done, total = master.items()
        if done or total:
            rate = self._rate.add(time.monotonic(), done)
            line += f" | {done}" + (f"/{total}" if total else "") + " items"
            if rate is not None:
                line += f", {rate:,.0f}/s"
                # No ETA while nothing runs (the last shard waiting out a backoff): the
                # rate says nothing about when it will be done.
                eta = eta_s(done, total, rate) if total and master.running else None
                if eta is not None:
                    line += f", ETA {format_duration(eta)}"
        return line

    def tick(self, master: Master) -> None:
        line = self.status_line(master)
        if line != self._last:
            self._last = line
            self._print(f"orch: {line}")


class LiveView(PlainView):
    """A rich live panel for terminals."""

    def __init__(self, verbose: bool = False) -> None:
        from rich.console import Console  # rich only for a terminal: plain lines never load it

        super().__init__(tick_s=0.2, verbose=verbose)
        self.console = Console()
        self._live: Any = None
        self._t0 = time.monotonic()

    def started(self, master: Master) -> None:
        from rich.live import Live  # rich only for a terminal (see __init__)

        self.console.print(
            f"[bold]orch[/] run [cyan]{master.run_id}[/]: {plural(len(master.shards), 'shard')}, "
            f"jobs {master.jobs}, logs in {master.run_dir}/logs"
        )
        self._live = Live(console=self.console, auto_refresh=False, transient=True)
        self._live.start()

    def event(self, text: str) -> None:
        self.console.print(f"[yellow]orch:[/] {text}", highlight=False)

    def line(self, shard_id: str, stream: Stream, data: bytes) -> None:
        style = "dim" if stream is Stream.STDOUT else "red"
        text = data.decode("utf-8", "replace").rstrip("\n")
        for ln in text.split("\n"):
            self.console.print(f"[{style}]\\[{shard_id}][/] {ln}", highlight=False, markup=True)

    def render(self, master: Master) -> Any:
        # rich only for a terminal (see __init__)
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        counts = master.counts()
        done, total = master.items()
        rate = self._rate.add(time.monotonic(), done)
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(ratio=1)
        finished = sum(counts.get(s, 0) for s in ("done", "failed", "stopped"))
        n = len(master.shards)
        if total:
            bar_total, bar_done, what = total, done, f"{done:,}/{total:,} items"
        else:
            bar_total, bar_done, what = n, finished, f"{finished}/{n} shards"
        tail = ""
        if rate:
            tail = f"  {rate:,.0f}/s"
            # No ETA while nothing runs (see status_line).
            eta = eta_s(done, total, rate) if total and master.running else None
            if eta is not None:
                tail += f"  ETA {format_duration(eta)}"
        grid.add_row(ProgressBar(total=max(1, bar_total), completed=bar_done))
        elapsed = format_duration(time.monotonic() - self._t0)
        grid.add_row(f"{what}{tail}  [dim]{elapsed}[/]")
        grid.add_row(counts_text(counts, lifecycle_order=True))
        nodes = Counter(
            rt.node[:12] for rt in master.shard_runs.made() if rt.node and rt.state is State.RUNNING
        )
        if nodes:  # --backend ray: where the running shards are
            placed = ", ".join(f"{n} {c} running" for n, c in sorted(nodes.items()))
            grid.add_row(f"nodes: {placed}")
        for text in self._notable(master):
            grid.add_row(text)
        return grid

    def _notable(self, master: Master, limit: int = 5) -> list[str]:
        """Shards worth a look: failing (in backoff), stalled-looking, then the slowest."""
        failing: list[str] = []
        quiet: list[tuple[float, int]] = []
        running: list[tuple[float, int]] = []
        now = master.loop.clock()
        quiet_s = max(5.0, 5 * master.task.heartbeat_interval_s)
        for rt in master.shard_runs.made():  # a shard never started is neither
            i, state = rt.index, rt.life.state
            if state is State.BACKOFF:
                if len(failing) < limit:
                    failing.append(f"[yellow]{master.shards[i].id}[/] {waiting(rt, now)}")
            elif state is State.RUNNING:
                watch = rt.watch
                if watch is not None and watch.last_move is not None:
                    idle = now - watch.last_move
                    if idle >= quiet_s:
                        quiet.append((-idle, i))
                        continue
                if rt.total:
                    running.append(((rt.done or 0) / rt.total, i))
        rows = failing
        for idle, i in sorted(quiet)[: max(0, limit - len(rows))]:
            rows.append(
                f"[magenta]{master.shards[i].id}[/] no progress for {format_duration(-idle)}"
            )
        for frac, i in sorted(running)[: max(0, limit - len(rows))]:
            rows.append(f"[dim]{master.shards[i].id}[/] {frac:6.1%}")
        return rows

    def tick(self, master: Master) -> None:
        if self._live is not None:
            self._live.update(self.render(master), refresh=True)

    def finished(self, master: Master) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def default_view(verbose: bool) -> PlainView:
    """The rich live panel on a terminal, plain lines otherwise."""
    return LiveView(verbose=verbose) if sys.stdout.isatty() else PlainView(verbose=verbose)
