"""Fixtures of the Ray suite (issue 13): a real two-node local cluster per session.

Skipped as a whole when Ray is not importable (``pip install 'orch[ray]'``;
the ``test`` extra installs it, so CI runs it). The cluster is started here
and nowhere else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.ray_cluster import FAST_HEALTH, Cluster, env_without_orch
from helpers.world import env  # noqa: F401  (the fixture: registered by being here)


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
