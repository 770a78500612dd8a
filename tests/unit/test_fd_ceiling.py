"""The default --jobs ceiling from the open-files limit (no processes: pure arithmetic)."""

from __future__ import annotations

import pytest

from orchestrator.concurrency import (
    FD_RESERVE,
    FDS_PER_ATTEMPT,
    LOG_FDS_PER_ATTEMPT,
    fd_ceiling,
)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1024, 192),  # few attempts: each may hold its two log files too (5 descriptors)
        (4096, 806),
        (10_304, 2048),  # the 4,096 log files are all open: from here on 3 per attempt
        (20_000, 5280),  # the hard limit on the bench machines (7,920 left no room for
        # the heartbeat connections: libzmq aborted the master)
        (1 << 20, 348_138),
    ],
)
def test_ceiling_counts_pipes_connection_and_capped_log_files_once(
    limit: int, expected: int
) -> None:
    assert fd_ceiling(limit, log_cap=4096) == expected


def test_ceiling_never_exceeds_the_limit() -> None:
    for limit in range(70, 30_000, 997):
        n = fd_ceiling(limit, log_cap=4096)
        logs = min(LOG_FDS_PER_ATTEMPT * n, 4096)
        assert FDS_PER_ATTEMPT * n + logs + FD_RESERVE <= limit or n == 1


def test_a_tiny_limit_still_allows_one_attempt() -> None:
    assert fd_ceiling(10, log_cap=4096) == 1


def test_jobs_past_the_ceiling_warn_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import assemble

    monkeypatch.setattr(assemble, "raise_fd_limit", lambda: 20_000)
    assemble._warn_past_fd_ceiling(5280)
    assert capsys.readouterr().err == ""
    assemble._warn_past_fd_ceiling(7920)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jobs 7920" in err and "holds 5280" in err
    assert "ulimit -Hn" in err
