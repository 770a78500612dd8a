"""Which kind a file is, and its conversion."""

from __future__ import annotations

import os
from collections.abc import Mapping

import orjson

from orchestrator.errors import ConfigError

__all__ = ["import_file"]

_JS = (".js", ".cjs", ".mjs")


def import_file(
    path: str, *, environ: Mapping[str, str] | None = None, node: str | None = None
) -> str:
    """The orch.toml text equivalent to a supervisord.conf or pm2 ecosystem file.

    Raises ``ConfigError`` (one line naming the file) when it cannot be read,
    is neither kind, or holds a value that cannot be mapped at all.
    """
    from orchestrator.configfile import display, read_file
    from orchestrator.migrate import pm2, supervisor

    shown = display(path)
    env = os.environ if environ is None else environ
    data = read_file(path)
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: not a text file (not valid UTF-8)") from None
    neither = ConfigError(
        f"{shown}: neither a supervisord.conf (no [program:x] section) nor a pm2 ecosystem"
        " file (no apps)"
    )
    lower = path.lower()
    if lower.endswith(_JS):
        doc = pm2.evaluate_js(path, shown, node)
        apps = pm2.apps_of(doc)
        if apps is None:
            raise neither
        return pm2.convert(apps, path, doc)
    stripped = text.lstrip()
    if (
        lower.endswith(".json")
        or stripped.startswith(("{", "["))
        and not stripped.startswith("[program:")
    ):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        apps = pm2.apps_of(doc) if doc is not None else None
        if apps is not None:
            return pm2.convert(apps, path, doc)
        if lower.endswith(".json"):
            raise neither
    try:
        parser = supervisor.parse(text, shown)
    except ConfigError:
        raise neither from None
    if not supervisor.looks_like_supervisor(parser):
        raise neither
    return supervisor.convert(parser, path, env)
