"""Starting a run: validate everything, then create the run, then supervise.

Order matters for promise 8: the task, the shard list, the template fields
and the executable are all checked before the run directory exists, so a
mistake leaves nothing behind and starts nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from orchestrator import environ
from orchestrator.config import TaskConfig, build_task, find_config, load_config
from orchestrator.errors import ConfigError, SpawnError, UsageError
from orchestrator.runs import STATE_DB, TASK_JSON, create_run_dir, home_dir, lock_run, new_run_id
from orchestrator.sources import ShardList, load_shards
from orchestrator.store import RunRow, Store
from orchestrator.template import CommandTemplate, check_fields

#: CLI option name -> orch.toml key.
_OVERRIDES = {
    "shards_path": "shards",
    "fmt": "format",
    "split": "split",
    "range_": "range",
    "jobs": "jobs",
    "restart": "restart",
    "max_restarts": "max_restarts",
    "stop_timeout": "stop_timeout",
    "backoff_initial": "backoff_initial",
    "backoff_max": "backoff_max",
    "backoff_reset": "backoff_reset",
    "heartbeat_interval": "heartbeat_interval",
    "heartbeat_timeout": "heartbeat_timeout",
    "stall_timeout": "stall_timeout",
    "require_heartbeat": "require_heartbeat",
    "max_memory": "max_memory",
    "cwd": "cwd",
    "shell": "shell",
}


def env_pairs(pairs: tuple[str, ...]) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def resolve_task(head: str | None, command: tuple[str, ...], opts: dict[str, Any]) -> TaskConfig:
    """Build the task from the positional TASK (a name or pkg.mod:func), the command and flags."""
    from orchestrator.cli import CALLABLE

    cwd = os.getcwd()
    # orch.toml is read only when a task is named (or --config given): an inline
    # `orch run -- CMD` must not fail on an unrelated, broken ./orch.toml.
    explicit = opts.get("config_path")
    path = find_config(explicit, cwd) if head is not None or explicit is not None else None
    cfg = load_config(path) if path else None
    overrides: dict[str, Any] = {key: opts.get(opt) for opt, key in _OVERRIDES.items()}
    overrides["env"] = env_pairs(opts.get("env") or ())
    file_task = None
    name = "run"
    if head is not None:
        if cfg is not None and head in cfg.tasks:
            file_task, name = cfg.task(head), head
        elif CALLABLE.fullmatch(head):
            overrides["call"] = head
            name = head.rsplit(":", 1)[1]
        elif cfg is not None:
            cfg.task(head)  # raises: unknown task, with the known ones listed
        else:
            raise ConfigError(
                f"unknown task {head!r}: no orch.toml in {cwd} (give --config FILE, "
                "or the command after '--')"
            )
    if command:
        overrides["command"] = list(command)
    return build_task(name=name, file_task=file_task, file_path=path, overrides=overrides, cwd=cwd)


def compile_command(task: TaskConfig) -> CommandTemplate:
    if task.call is not None:
        argv: tuple[str, ...] = (sys.executable, "-m", "shards.runner", task.call)
        return CommandTemplate.compile(argv, dict(task.env), where="call")
    return CommandTemplate.compile(task.command, dict(task.env), shell=task.shell, where="command")


def preflight(task: TaskConfig, template: CommandTemplate, shards: ShardList) -> None:
    """Check what would make every attempt fail: unknown fields, a missing executable."""
    from orchestrator.backends.local import resolve_executable

    check_fields(template, shards)
    argv0 = task.command[0] if task.command and task.call is None else None
    if argv0 is not None and "{" not in argv0:
        try:
            resolve_executable(argv0, os.environ.get("PATH"), task.cwd)
        except SpawnError as exc:
            raise ConfigError(f"command: {exc}") from None


def _private(path: str, flags: int) -> int:
    """``open(..., opener=_private)``: a new file readable by its owner only."""
    return os.open(path, flags, 0o600)


def create_run(
    task: TaskConfig, shards: ShardList, *, home: str | None, name: str | None
) -> tuple[str, str, Store]:
    """Make the run directory, the database and the task snapshot."""
    root = home_dir(home)
    run_id = new_run_id()
    try:
        run_dir = create_run_dir(root, run_id)
    except OSError as exc:
        raise ConfigError(f"cannot create a run in {root}: {exc.strerror}") from None
    task_json = task.to_json()
    # 0600 like everything in the run directory: the task may hold secrets (--env TOKEN=...).
    with open(os.path.join(run_dir, TASK_JSON), "wb", opener=_private) as f:
        f.write(
            orjson.dumps({"task": task_json, "source": shards.source}, option=orjson.OPT_INDENT_2)
        )
    row = RunRow(
        id=run_id,
        name=name or task.name,
        task_json=task_json,
        source=shards.source,
        shard_count=len(shards),
        started_at=time.time(),
        jobs=task.jobs,
    )
    store = Store.create(
        os.path.join(run_dir, STATE_DB), row, ((s.id, s.record, s.line) for s in shards)
    )
    environ.record(run_dir, os.environ)  # for orch resume, from any shell
    return run_id, run_dir, store


def prepare(
    head: str | None, command: tuple[str, ...], opts: dict[str, Any]
) -> tuple[TaskConfig, ShardList]:
    task = resolve_task(head, command, opts)
    if task.cwd is None:
        # Pin the directory the user ran orch in: a detached or resumed master runs elsewhere.
        task = dataclasses.replace(task, cwd=os.getcwd())
    shards = load_shards(task.shards, split=task.split, range_=task.range, fmt=task.format)
    preflight(task, compile_command(task), shards)
    return task, shards


def run_command(head: str | None, command: tuple[str, ...], opts: dict[str, Any]) -> int:
    """``orch run``: returns the exit code."""
    task, shards = prepare(head, command, opts)
    run_id, run_dir, store = create_run(task, shards, home=opts.get("home"), name=opts.get("name"))
    lock_fd = lock_run(run_dir)
    assert lock_fd is not None  # a new run directory: nobody else can hold it
    if opts.get("detach"):
        from orchestrator.daemon import detach

        store.close()
        return detach(run_id, run_dir, lock_fd)
    try:
        return supervise(run_id, run_dir, task, shards, store, verbose=bool(opts.get("verbose")))
    finally:
        os.close(lock_fd)


def supervise(
    run_id: str,
    run_dir: str,
    task: TaskConfig,
    shards: ShardList,
    store: Store,
    *,
    verbose: bool = False,
    view: Any = None,
    retry_failed: bool = False,
    base_env: Mapping[str, str] | None = None,
) -> int:
    from orchestrator.master import Master
    from orchestrator.show import print_summary
    from orchestrator.ui import LiveView, PlainView

    if view is None:
        view = LiveView(verbose=verbose) if sys.stdout.isatty() else PlainView(verbose=verbose)
    master = Master(
        run_id=run_id,
        run_dir=run_dir,
        task=task,
        shards=shards,
        store=store,
        view=view,
        retry_failed=retry_failed,
        base_env=base_env,
    )
    code = master.run()
    if master.store_error is None:  # else the database holds no end: the line said it all
        print_summary(store, run_dir)
    store.close()
    return code
