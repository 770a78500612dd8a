"""``orch gc`` on real run directories: finished and lost runs go, live ones never."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.world import ORCH, orch_env

from orchestrator import procfs
from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.opsconfig import GcConfig, ops_config
from orchestrator.prune import collect, plan
from orchestrator.store import RunRow, Store

DAY = 86400.0


def make_run(
    home: Path,
    run_id: str,
    state: str,
    *,
    ended_ago_s: float | None = None,
    pid: int | None = None,
    log_bytes: int = 10_000,
) -> Path:
    d = home / "runs" / run_id
    (d / "logs").mkdir(parents=True, mode=0o700)
    (d / "task.json").write_text("{}")
    (d / "logs" / "0-0.out").write_bytes(b"x" * log_bytes)
    store = Store.create(
        str(d / "state.db"),
        RunRow(run_id, run_id[-4:], {}, "split", 1, time.time(), None),
        [("0", {}, 0)],
    )
    now = time.time()
    fields: dict[str, object] = {"state": state}
    if ended_ago_s is not None:
        fields["ended_at"] = now - ended_ago_s
    if pid is not None:
        fields["master_pid"] = pid
        fields["master_create_time"] = procfs.start_time(pid)
    store.set_run(**fields)
    store.commit()
    store.close()
    return d


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def home(tmp_path: Path, dead_pid: int) -> Iterator[Path]:
    h = tmp_path / "home"
    make_run(h, "20261101-100000-aaaa", "done", ended_ago_s=30 * DAY)
    make_run(h, "20261102-100000-bbbb", "failed", ended_ago_s=20 * DAY)
    make_run(h, "20261103-100000-cccc", "running", pid=dead_pid)  # lost: its master is gone
    make_run(h, "20261104-100000-dddd", "running", pid=os.getpid())  # live: this process
    make_run(h, "20261105-100000-eeee", "stopped", ended_ago_s=1 * DAY)
    make_run(h, "20261106-100000-ffff", "done", ended_ago_s=60)
    make_run(h, "20261107-100000-gggg", "pending")  # being created: no master recorded yet
    yield h


def remaining(home: Path) -> list[str]:
    return sorted(p.name[-4:] for p in (home / "runs").iterdir())


def gc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ORCH, "gc", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=orch_env(home),
        timeout=60,
    )


def test_keep_and_older_than_select_finished_runs(home: Path) -> None:
    ids = lambda runs: [r.run_id[-4:] for r in runs]  # noqa: E731
    now = time.time()
    assert ids(plan(str(home), keep=0, older_than_s=None, now=now)) == [
        "ffff",
        "eeee",
        "cccc",
        "bbbb",
        "aaaa",
    ]  # never dddd, the live one, nor gggg, the one being created
    assert ids(plan(str(home), keep=2, older_than_s=None, now=now)) == ["cccc", "bbbb", "aaaa"]
    assert ids(plan(str(home), keep=None, older_than_s=7 * DAY, now=now)) == ["bbbb", "aaaa"]
    assert ids(plan(str(home), keep=4, older_than_s=7 * DAY, now=now)) == ["aaaa"]
    assert plan(str(home), keep=None, older_than_s=None, now=now) == []  # default keeps 20


def test_orch_gc_removes_and_prints_what_it_freed(home: Path) -> None:
    done = gc(home, "--older-than", "7d", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert remaining(home) == ["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff", "gggg"]
    assert "would remove 2 runs" in done.stdout
    done = gc(home, "--keep", "1")
    assert done.returncode == 0, done.stderr
    assert remaining(home) == ["dddd", "ffff", "gggg"]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("removed 4 runs, freed ")
    assert "removed 20261103-100000-cccc (cccc): lost" in done.stdout
    # 4 runs of at least 10,000 log bytes each, plus their databases
    assert float(lines[-1].split("freed ")[1].split()[0]) >= 39.0


def test_a_run_whose_lock_is_held_is_not_removed(home: Path) -> None:
    run = home / "runs" / "20261101-100000-aaaa"
    fd = os.open(run / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a resuming master holds it
    try:
        removed, total = collect(str(home), keep=0, older_than_s=None)
        assert "aaaa" not in [r.run_id[-4:] for r, _ in removed]
        assert run.exists() and total > 0
    finally:
        os.close(fd)


def test_a_run_still_delivering_notifications_is_kept(home: Path) -> None:
    run = home / "runs" / "20261102-100000-bbbb"
    fd = os.open(run / "notify.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a deliverer holds it
    try:
        removed, _ = collect(str(home), keep=0, older_than_s=None)
        assert "bbbb" not in [r.run_id[-4:] for r, _ in removed] and run.exists()
    finally:
        os.close(fd)
    removed, _ = collect(str(home), keep=0, older_than_s=None)
    assert "bbbb" in [r.run_id[-4:] for r, _ in removed] and not run.exists()


def test_bad_flags_are_one_line(home: Path) -> None:
    done = gc(home, "--older-than", "a week")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("orch: --older-than: invalid duration 'a week'")
    done = gc(home, "--keep", "-1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_gc_table(tmp_path: Path) -> None:
    path = tmp_path / "orch.toml"
    path.write_text('[gc]\nkeep_runs = 50\nolder_than = "14d"\n')
    assert ops_config(load_config(str(path))).gc == GcConfig(keep_runs=50, older_than_s=14 * DAY)
    path.write_text('[gc]\nolder_than = "soon"\n')
    with pytest.raises(ConfigError, match=r"\[gc\] older_than: invalid duration 'soon'"):
        load_config(str(path))
    path.write_text("[gc]\nkeep = 5\n")
    with pytest.raises(ConfigError, match=r"\[gc\]: unknown key 'keep'"):
        load_config(str(path))
