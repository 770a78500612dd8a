"""Fixtures of the ``orch serve`` suites; the helpers live in ``servetest.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servetest import Served


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real ``orch serve`` on 127.0.0.1 for the session, with its own home and orch.toml."""
    server = Served(Path(tmp_path_factory.mktemp("serve")))
    try:
        yield server
    finally:
        server.stop()
