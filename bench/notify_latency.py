"""Notification delivery latency after a run ends (issue 12: target <= 1 s).

``python -m bench.notify_latency [N]``: N times, a run's store records the
run's end with a notification in the same commit, ``after_commit`` starts the
deliverer (a new process, as after a foreground ``orch run`` returns), and a
local HTTP receiver on 127.0.0.1 stamps the arrival. Prints the latencies
(commit -> receiver) and their ratio to the 1 s target.

Then, end to end, N real ``orch run`` of a task with ``notify`` (foreground,
one shard running ``true``): from the moment ``orch run`` returned, and from
the run's recorded end (``ended_at``), to the receiver's arrival.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.notify.notifier import for_run
from orchestrator.notifyconfig import Channel, Kind
from orchestrator.store import RunRow, Store

TARGET_S = 1.0


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    arrived: list[float] = []
    got = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived.append(time.perf_counter())
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            got.set()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    latencies = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            run_dir = os.path.join(tmp, f"run{i}")
            os.mkdir(run_dir, 0o700)
            row = RunRow(f"bench-{i}", "bench", {}, "split", 1, time.time(), None)
            store = Store.create(os.path.join(run_dir, "state.db"), row, [("0", {}, 0)])
            notifier = for_run(store, run_dir, [Channel("hook", Kind.WEBHOOK, url)])
            got.clear()
            store.set_run(state="done", ended_at=time.time(), exit_code=0)
            notifier.on_run_state("done")
            t0 = time.perf_counter()
            store.commit()
            notifier.after_commit()
            if not got.wait(30):
                print(f"run {i}: not delivered within 30 s")
                return 1
            latencies.append(arrived[-1] - t0)
            store.close()
        # deliverers linger 3 s after draining; stop ours now that the figures are in
        for pid in _deliverers(tmp):
            os.kill(pid, signal.SIGTERM)
    print(f"notification delivery after a run ends, {n} runs (each a new deliverer process)")
    _report(latencies)
    returned, ended = _orch_runs(n, url, got, arrived)
    server.shutdown()
    if not returned:
        return 1
    print(f"end to end: {n} foreground 'orch run' of a task with notify = [...]")
    print("  from 'orch run' returning to the receiver:")
    _report(returned)
    print("  from the run's recorded end (ended_at) to the receiver:")
    _report(ended)
    return 0


def _report(latencies: list[float]) -> None:
    med, worst = statistics.median(latencies), max(latencies)
    print(f"  median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")
    ratio = f"median at {med / TARGET_S:.2f}x, max at {worst / TARGET_S:.2f}x"
    print(f"  target {TARGET_S:.1f} s: {ratio}")


def _orch_runs(
    n: int, url: str, got: threading.Event, arrived: list[float]
) -> tuple[list[float], list[float]]:
    import sqlite3
    import subprocess

    orch = os.path.join(os.path.dirname(sys.executable), "orch")
    returned: list[float] = []
    ended: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "orch.toml"), "w") as f:
            f.write(
                f'[notify.hook]\nkind = "webhook"\nurl = "{url}"\nevents = ["done"]\n\n'
                '[tasks.t]\ncommand = ["true"]\nsplit = 1\nnotify = ["hook"]\n'
            )
        env = {**os.environ, "ORCH_HOME": os.path.join(tmp, "home")}
        for i in range(n):
            got.clear()
            proc = subprocess.run([orch, "run", "t"], cwd=tmp, env=env, capture_output=True)
            t_ret, w_ret = time.perf_counter(), time.time()
            if proc.returncode != 0:
                print(f"orch run {i}: exit {proc.returncode}: {proc.stderr.decode()[-200:]}")
                return [], []
            if not got.wait(30):
                print(f"orch run {i}: not delivered within 30 s")
                return [], []
            arrival = arrived[-1]
            returned.append(max(0.0, arrival - t_ret))
            runs = os.path.join(tmp, "home", "runs")
            newest = sorted(os.listdir(runs))[-1]
            with sqlite3.connect(os.path.join(runs, newest, "state.db")) as db:
                (end,) = db.execute("SELECT ended_at FROM run").fetchone()
            ended.append(w_ret - end + (arrival - t_ret))
        for pid in _deliverers(tmp):
            os.kill(pid, signal.SIGTERM)
    return returned, ended


def _deliverers(root: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.notify.deliver" in argv and any(
            a.startswith(root.encode()) for a in argv
        ):
            out.append(int(pid))
    return out


if __name__ == "__main__":
    sys.exit(main())
