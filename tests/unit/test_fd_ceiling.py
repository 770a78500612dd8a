"""The default --jobs ceiling from the open-files limit (no processes: pure arithmetic)."""

from __future__ import annotations

import pytest

from orchestrator.concurrency import FD_RESERVE, FDS_PER_ATTEMPT, fd_ceiling


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1024, 240),  # few attempts: each may hold its two log files too (4 descriptors)
        (4096, 1008),
        (8256, 2048),  # the 4,096 log files are all open: from here on 2 per attempt
        (20_000, 7920),  # the hard limit on the bench machines (4,984 at 4 per attempt)
        (1 << 20, 522_208),
    ],
)
def test_ceiling_counts_pipes_per_attempt_and_capped_log_files_once(
    limit: int, expected: int
) -> None:
    assert fd_ceiling(limit, log_cap=4096) == expected


def test_ceiling_never_exceeds_the_limit() -> None:
    for limit in range(70, 30_000, 997):
        n = fd_ceiling(limit, log_cap=4096)
        logs = min(2 * n, 4096)
        assert FDS_PER_ATTEMPT * n + logs + FD_RESERVE <= limit or n == 1


def test_a_tiny_limit_still_allows_one_attempt() -> None:
    assert fd_ceiling(10, log_cap=4096) == 1
