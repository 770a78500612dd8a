"""Fixtures of the integration suites; the helpers live in ``tests/helpers`` (``helpers.world``)."""

from helpers.world import env  # noqa: F401  (the fixture: registered by being here)
