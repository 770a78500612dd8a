"""Fixtures of the integration suites; the helpers live in ``itest.py``.

Test modules import helpers from ``itest`` (a unique name), not from
``conftest``: with several test directories each having a conftest, an
import by that name would depend on which directory pytest collected first.
"""

from itest import env  # noqa: F401  (the fixture: registered by being here)
