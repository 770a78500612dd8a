"""The environment a run started with, kept so that ``orch resume`` gives it back.

Attempts inherit the master's environment. A master started by ``orch
resume`` runs in whatever shell the user resumes from, so without a record a
run started with ``INHERITED=yes`` (or a virtualenv's PATH, a DSN, a token)
would resume without it. ``orch run`` therefore records its environment in
the run directory, mode 0600 like everything there, and every master of the
run -- the first, a detached one, a resumed one -- starts attempts from that
record. ``--env KEY=VALUE`` on resume adds templated entries that win over
the task's ``env`` and are kept for later resumes.

The file is read only here: ``orch status``, ``--json`` and the API never
read or show it (it may hold secrets).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from orchestrator.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.config import TaskConfig

__all__ = ["ENVIRON", "add_env", "for_master", "load", "record"]

#: In the run directory: {"environ": {...}, "env": {...resume --env...}}.
ENVIRON = "environ.json"


def _write(run_dir: str, data: Mapping[str, Mapping[str, str]]) -> None:
    """Replace the file atomically (write a 0600 temp file, rename). No fsync, like
    task.json: it costs milliseconds at every run's start on a busy disk, and the file
    is only read back after the master dies, not after a power loss."""
    path = os.path.join(run_dir, ENVIRON)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(orjson.dumps(data))
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def record(run_dir: str, environ: Mapping[str, str]) -> None:
    """Record the environment a new run starts with."""
    _write(run_dir, {"environ": dict(environ), "env": {}})


def load(run_dir: str) -> tuple[dict[str, str] | None, dict[str, str]]:
    """(the recorded starting environment, the ``--env`` entries added on resume).

    The environment is None for a run recorded before this file existed; the
    caller then falls back to its own environment.
    """
    path = os.path.join(run_dir, ENVIRON)
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except FileNotFoundError:
        return None, {}
    except OSError as exc:
        raise OrchError(f"{path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError:
        raise OrchError(f"{path}: not valid JSON; the run's environment is lost") from None
    environ, env = data.get("environ"), data.get("env") or {}
    return (dict(environ) if isinstance(environ, dict) else None), dict(env)


def add_env(run_dir: str, env: Mapping[str, str]) -> None:
    """Keep ``orch resume --env`` entries for this and every later master of the run."""
    if not env:
        return
    environ, kept = load(run_dir)
    kept.update(env)
    _write(run_dir, {"environ": environ if environ is not None else dict(os.environ), "env": kept})


def for_master(run_dir: str, task: TaskConfig) -> tuple[TaskConfig, dict[str, str]]:
    """What a master of an existing run starts attempts with: the task, its ``env`` with
    the resume ``--env`` entries on top, and the recorded starting environment."""
    environ, env = load(run_dir)
    if env:
        task = dataclasses.replace(task, env={**task.env, **env})
    return task, dict(os.environ if environ is None else environ)
