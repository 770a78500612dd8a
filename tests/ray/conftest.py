"""Fixtures of the Ray suite (issue 13): a real two-node local cluster per session.

Skipped as a whole when Ray is not importable (``pip install 'orch[ray]'``;
the ``test`` extra installs it, so CI runs it). The cluster is started here
and nowhere else.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The black-box helpers of the integration suite (run orch, poll_for, run_pids).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from itest import env  # noqa: E402, F401  (the fixture: registered by being here)
from raytest import FAST_HEALTH, Cluster, env_without_orch  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    pytest.importorskip("ray")
    # Short paths: Ray's socket paths live under the temp dir and must fit 107 bytes.
    root = Path(os.environ.get("ORCH_RAY_TEST_ROOT", "/tmp")) / f"orch-ray-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    world = Cluster(root=root, env={**env_without_orch(), **FAST_HEALTH})
    try:
        world.start_head("nodeA")
        world.add_node("nodeB")
        yield world
    finally:
        world.stop()
        shutil.rmtree(root, ignore_errors=True)  # Ray's session logs of this test session
