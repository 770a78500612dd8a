"""``orch import FILE``: a supervisord.conf or pm2 ecosystem file as an orch.toml.

``import_file`` detects the kind, maps every program/app to a
``[tasks.NAME]`` table and lists what has no orch equivalent as TOML
comments; docs/migrating.md maps every key. A file that is neither kind is a
one-line ``ConfigError`` (exit 2) naming it.
"""

from __future__ import annotations

from orchestrator.migrate.detect import import_file

__all__ = ["import_file"]
