"""Fixtures and options of the reliability suites (issue 6).

- ``--slow`` (or ``ORCH_SLOW=1`` in the environment) selects the long
  variants: more faults, for longer. The short ones run in CI.
- ``env``: one test's world (a cwd and a home under ``tmp_path``) whose
  teardown SIGKILLs, by pid, every process that carries this test's
  ``ORCH_HOME``: foreground and detached masters, guardians, attempts and
  their grandchildren. Nothing else is ever signalled.

The helpers themselves live in ``tests/helpers`` (``helpers.reliability``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.reliability import Env, kill_home


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the long variants of the reliability suites (also ORCH_SLOW=1)")


@pytest.fixture(scope="session")
def slow(pytestconfig: pytest.Config) -> bool:
    """True when the long variants were asked for."""
    try:
        flag = bool(pytestconfig.getoption("--slow"))
    except ValueError:  # this conftest was not loaded early enough to add the option
        flag = False
    return flag or os.environ.get("ORCH_SLOW", "") not in ("", "0")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = Env(tmp_path)
    try:
        yield world
    finally:
        try:
            world.cleanup()
        finally:
            kill_home(world.home)
