"""Resource faults: logs that cannot be written, a shard flooding stdout, 1,000 shards at once.

- The master's log files hit a file-size limit mid-run (RLIMIT_FSIZE set on the live
  master with prlimit: writes fail with EFBIG; the master must not die of SIGXFSZ), or
  the log directory is replaced mid-run by a tiny full filesystem (a 32 KiB tmpfs:
  ENOSPC). The run keeps supervising, says in one line what failed, and loses no state:
  progress and checkpoints reported on stdout after the failure are still recorded.
- A shard writes millions of lines to stdout at full speed while its siblings heartbeat
  every 0.1 s with a 1 s heartbeat timeout: no sibling is declared hung, the master
  answers the control socket throughout, and every line is in the log files (rotated
  ones included).
- ``--split 1000 -- sleep 0.5``: a thousand attempts started at once all end done.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers.reliability import (
    DEADLINE_S,
    PYTHON,
    Env,
    Run,
    control,
    count_lines,
    poll_for,
    run_pids,
    wait_run,
)

FLOOD_LINES_SH = """\
while [ ! -e go ]; do sleep 0.02; done
yes 'line of output that fills the log, 64 bytes of it, more or less' | head -n {lines}
echo 'an error line' >&2
echo '##orch {{"done": 1, "total": 1, "checkpoint": {{"after": "the failure"}}}}'
"""


def _finish(env: Env, proc: subprocess.Popen[str]) -> str:
    code = proc.wait(timeout=DEADLINE_S * 2)
    output = (env.cwd / "orch.stdout").read_text() + (env.cwd / "orch.stderr").read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return output


def _state_kept(env: Env, run: Run, shards: int) -> None:
    """Everything reported after the logs failed is in the database."""
    detail = env.status(run.id)
    assert (detail["state"], detail["exit_code"]) == ("done", 0), detail
    for shard in detail["shards"]:
        summary = (shard["state"], shard["attempts"], shard["done"], shard["total"],
                   shard["checkpoint"])
        assert summary == ("done", 1, 1, 1, {"after": "the failure"}), shard
    assert len(detail["shards"]) == shards
    assert run.integrity() == "ok"


def test_log_file_size_limit_on_the_live_master(env: Env) -> None:
    """RLIMIT_FSIZE of 1 MiB on the running master, shards writing 3 MB each: writes fail
    with EFBIG (SIGXFSZ is ignored, the master lives), one line per file says so, and
    the progress and checkpoint printed after the failure are recorded."""
    limit = 1 << 20
    env.script("flood.sh", FLOOD_LINES_SH.format(lines=48_000))
    proc = env.start("run", "--split", "3", "--", "sh", "flood.sh")
    run = wait_run(env)
    assert run.row()["master_pid"] == proc.pid  # a foreground run: orch itself is the master
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    (env.cwd / "go").touch()
    output = _finish(env, proc)
    failures = [ln for ln in output.splitlines() if "File too large" in ln]
    assert len(failures) == 3, output[-3000:]  # one line per log file, not one per write
    for line in failures:
        assert line.startswith("orch: ") and ".out: File too large; dropping output" in line
    _state_kept(env, run, 3)
    for log in (run.dir / "logs").iterdir():
        assert log.stat().st_size <= limit, log


def _mount_tmpfs(path: Path, size: str) -> bool:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    return done.returncode == 0


def test_log_directory_replaced_by_a_full_filesystem(env: Env) -> None:
    """Mid-run, the log directory is swapped for a 32 KiB tmpfs; shards write 1.5 MB each
    with 64 KiB rotation, so new files land on the tiny filesystem and fill it: the run
    says 'No space left on device' once per file and state is kept."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    env.write("orch.toml", '[tasks.flood]\ncommand = ["sh", "flood.sh"]\nsplit = 2\n'
                           'log_max_size = "64KiB"\nlog_backups = 2\n')
    env.script("flood.sh", FLOOD_LINES_SH.format(lines=24_000))
    proc = env.start("run", "flood")
    run = wait_run(env)
    logs = run.dir / "logs"
    os.rename(logs, run.dir / "logs.before")
    logs.mkdir(mode=0o700)
    if not _mount_tmpfs(logs, "32k"):
        (env.cwd / "go").touch()
        _finish(env, proc)
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        (env.cwd / "go").touch()
        output = _finish(env, proc)
        full = [ln for ln in output.splitlines() if "No space left on device" in ln]
        assert full, output[-3000:]
        assert all(ln.startswith("orch: ") and "dropping output" in ln for ln in full), full
        assert len(full) <= 4 * 3, full  # once per failing stretch of a file, not per write
        _state_kept(env, run, 2)
    finally:
        subprocess.run(["umount", "-l", str(logs)], capture_output=True)


BEAT_OR_FLOOD = """\
import os, sys, time
from pathlib import Path
here = Path(__file__).parent
if sys.argv[1] == "flood":
    os.execvp("sh", ["sh", "-c", "yes '{line}' | head -n {lines} && touch flood-done"])
import shards
shards.progress(0)
deadline = time.monotonic() + 120
while not (here / "release").exists() and time.monotonic() < deadline:
    shards.advance()
    time.sleep(0.05)  # allowed-sleep: simulated work
"""


def test_stdout_flood_starves_nobody_and_loses_no_line(env: Env, slow: bool) -> None:
    """One shard writes millions of lines at full speed (rotated every 8 MiB) while three
    siblings heartbeat every 0.1 s with a 1 s timeout: none is declared hung, the control
    socket and ``orch status`` answer throughout, and every line is in the logs exactly
    once."""
    lines = 20_000_000 if slow else 6_000_000
    text = "the quick brown fox"
    env.script("shard.py", BEAT_OR_FLOOD.format(line=text, lines=lines))
    env.write("shards.csv", "id,role\nflood,flood\nb1,beat\nb2,beat\nb3,beat\n")
    env.write("orch.toml", '[tasks.t]\nlog_max_size = "8MiB"\nlog_backups = 1000\n')
    proc = env.start("run", "t", "--shards", "shards.csv", "--heartbeat-interval", "0.1",
                     "--heartbeat-timeout", "1", "--",
                     PYTHON, str(env.cwd / "shard.py"), "{role}")
    run = wait_run(env)
    endpoint = str(run.row()["control"])
    flood_done = env.cwd / "flood-done"
    latencies: list[float] = []
    statuses: list[int] = []

    def ping() -> None:
        while not flood_done.exists():
            t0 = time.monotonic()
            reply = control(endpoint, {"v": 1, "op": "ping"}, timeout_s=10)
            latencies.append(time.monotonic() - t0 if reply is not None else float("inf"))
            time.sleep(0.02)  # allowed-sleep: sampling pace

    def ask_status() -> None:
        while not flood_done.exists():
            statuses.append(env.orch("status", run.id, "--json").returncode)

    threads = [threading.Thread(target=f, daemon=True) for f in (ping, ask_status)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        assert poll_for(flood_done.exists, timeout=DEADLINE_S * 2)
        flood_s = time.monotonic() - t0
        for t in threads:
            t.join(30)
        counts = poll_for(lambda: (control(endpoint, {"v": 1, "op": "status"}) or {}).get(
            "counts") == {"done": 1, "running": 3}, timeout=DEADLINE_S)
        assert counts, control(endpoint, {"v": 1, "op": "status"})
    finally:
        (env.cwd / "release").touch()
    _finish(env, proc)
    try:
        detail = env.status(run.id)
        for shard in detail["shards"]:
            assert (shard["state"], shard["attempts"]) == ("done", 1), shard  # nobody hung
        assert latencies and max(latencies) < 2.0, (len(latencies), max(latencies))
        assert statuses and set(statuses) == {0}, statuses
        outs = sorted((run.dir / "logs").glob("00000-flood.out*"))
        assert len(outs) > 1, outs  # it did rotate
        # A line is never split between two files: count each file whole (about 8 MiB).
        needle = f"Z {text}\n".encode()
        stamped = sum(p.read_bytes().count(needle) for p in outs)
        total = count_lines(outs)
        assert stamped == lines, (stamped, lines)
        assert total == lines + 2, total  # and the two attempt markers
        size = sum(p.stat().st_size for p in outs)
        print(f"\nstdout flood: {lines} lines ({size / 1e6:.0f} MB of logs in {len(outs)} files) "
              f"in {flood_s:.1f}s; {len(latencies)} pings during it, slowest "
              f"{max(latencies) * 1000:.0f} ms; {len(statuses)} orch status; siblings never hung")
    finally:
        shutil.rmtree(run.dir / "logs", ignore_errors=True)  # hundreds of MB: not kept


def test_a_thousand_shards_start_at_once(env: Env) -> None:
    """``--split 1000 -- sleep 0.5``: all 1,000 run at once and end done, one attempt each."""
    proc = env.start("run", "--split", "1000", "--", "sleep", "0.5")
    t0 = time.monotonic()
    run = wait_run(env)
    peak = 0
    while proc.poll() is None and time.monotonic() - t0 < DEADLINE_S * 2:
        peak = max(peak, len(run_pids(run.id, env.home)))
        time.sleep(0.05)  # allowed-sleep: sampling pace
    elapsed = time.monotonic() - t0
    _finish(env, proc)
    detail = env.status(run.id)
    assert (detail["state"], detail["exit_code"], detail["jobs"]) == ("done", 0, 1000)
    assert detail["counts"] == {"done": 1000}
    assert all(s["attempts"] == 1 and s["exit_code"] == 0 for s in detail["shards"])
    assert run.integrity() == "ok"
    assert not run_pids(run.id, env.home)
    print(f"\n1,000 shards at once: done in {elapsed:.1f}s, at most {peak} alive at one "
          f"sample")
