"""procfs: the /proc fast path and the psutil fallback give the same answers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator import procfs

needs_proc = pytest.mark.skipif(not procfs.HAVE_PROC, reason="no /proc to compare with")


@pytest.fixture(params=["proc", "psutil"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "proc" and not procfs.HAVE_PROC:
        pytest.skip("no /proc")
    monkeypatch.setattr(procfs, "HAVE_PROC", request.param == "proc")
    return str(request.param)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "ORCH_TEST_MARK": "procfs-fallback"}
    # The child says it runs (its environment is in /proc only after exec), then blocks
    # reading stdin until the test closes it: no sleep involved.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_live_process_exists_with_a_stable_start_time(path: str) -> None:
    me = os.getpid()
    assert procfs.exists(me)
    first = procfs.start_time(me)
    assert first is not None and first == procfs.start_time(me)
    assert procfs.live_start_time(me) == first
    assert procfs.process_group(me) == os.getpgid(me)


def test_a_gone_process_is_gone(path: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert not procfs.exists(proc.pid)
    assert procfs.live_start_time(proc.pid) is None
    assert procfs.cpu_and_rss(proc.pid) == (None, None)


def test_a_zombie_is_not_alive(path: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not procfs.exists(proc.pid)
        assert procfs.live_start_time(proc.pid) is None
    finally:
        proc.wait(timeout=30)


def test_children_and_environment(path: str, child: subprocess.Popen[bytes]) -> None:
    assert child.pid in procfs.own_children()
    assert b"ORCH_TEST_MARK=procfs-fallback" in procfs.environ(child.pid)
    assert procfs.with_env({b"ORCH_TEST_MARK=procfs-fallback"}) == [child.pid]


def test_cpu_and_rss_of_a_live_process(path: str) -> None:
    cpu, rss = procfs.cpu_and_rss(os.getpid())
    assert cpu is not None and cpu >= 0.0
    assert rss is not None and rss > 1024 * 1024  # a Python interpreter holds megabytes


@needs_proc
def test_both_paths_agree_on_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    _, fast = procfs.cpu_and_rss(os.getpid())
    monkeypatch.setattr(procfs, "HAVE_PROC", False)
    _, slow = procfs.cpu_and_rss(os.getpid())
    assert fast is not None and slow is not None
    assert abs(fast - slow) < max(fast, slow) * 0.5
