"""orch: a sharded multi-process orchestrator.

``orchestrator.run(fn, split=4)`` runs a Python callable once per shard
(see ``orchestrator.api``); the ``orch`` command is ``orchestrator.cli``.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `orch status` does not pay for the API's imports.
    if name == "run":
        from orchestrator.api import run

        return run
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
