"""Preparing ``orch run``: the task from TASK, flags and orch.toml; the shard list; preflight.

Order matters for promise 8: the task, the shard list, the template fields
and the executable are all checked before the run directory exists (made
afterwards by ``launch.run_command``), so a mistake leaves nothing behind and
starts nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from orchestrator.backends.local import resolve_executable
from orchestrator.config import CALLABLE, TaskConfig, build_task, find_config, load_config
from orchestrator.errors import ConfigError, SpawnError, UsageError
from orchestrator.settings import cli_overrides
from orchestrator.sources import ShardList, load_shards
from orchestrator.template import CommandTemplate, check_fields, compile_command

if TYPE_CHECKING:
    from orchestrator.notifyconfig import Channel


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
    cwd = os.getcwd()
    # orch.toml is read only when a task is named (or --config given): an inline
    # `orch run -- CMD` must not fail on an unrelated, broken ./orch.toml.
    explicit = opts.get("config_path")
    path = find_config(explicit, cwd) if head is not None or explicit is not None else None
    cfg = load_config(path) if path else None
    overrides = cli_overrides(opts)
    overrides["env"] = env_pairs(opts.get("env") or ())
    file_task = None
    name = "run"
    if head is not None:
        if cfg is not None and head in cfg.tasks:
            file_task, name = cfg.task(head), head
        elif ":" in head:
            # pkg.mod:func, checked by build_task against config.CALLABLE (the one pattern).
            overrides["call"] = head
            name = head.rsplit(":", 1)[1] if CALLABLE.fullmatch(head) else name
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


def notify_channels(head: str | None, opts: dict[str, Any]) -> tuple[Channel, ...]:
    """The notification channels of task ``head`` (orch.toml ``notify``), secrets checked.

    An unset ``secret_env`` is a ConfigError here, before the run exists.
    """
    path = find_config(opts.get("config_path"), os.getcwd())
    if head is None or path is None:
        return ()
    cfg = load_config(path)
    if head not in cfg.tasks:
        return ()
    from orchestrator.opsconfig import ops_config  # a task of orch.toml: not in `orch run -- CMD`

    channels = ops_config(cfg).notify.for_task(head)
    for channel in channels:
        channel.resolved_secret()
    return channels


def preflight(task: TaskConfig, template: CommandTemplate, shards: ShardList) -> None:
    """Check what would make every attempt fail: unknown fields, a missing executable."""
    check_fields(template, shards)
    argv0 = task.command[0] if task.command and task.call is None else None
    if argv0 is not None and "{" not in argv0:
        try:
            resolve_executable(argv0, os.environ.get("PATH"), task.cwd)
        except SpawnError as exc:
            raise ConfigError(f"command: {exc}") from None


def prepare(
    head: str | None, command: tuple[str, ...], opts: dict[str, Any]
) -> tuple[TaskConfig, ShardList]:
    task = resolve_task(head, command, opts)
    if task.cwd is None:
        # Pin the directory the user ran orch in: a detached or resumed master runs elsewhere.
        task = dataclasses.replace(task, cwd=os.getcwd())
    shards = load_shards(task.shards, split=task.split, range_=task.range, fmt=task.format)
    preflight(task, compile_command(task), shards)
    if task.backend == "ray":
        from orchestrator.backends.ray import check_cluster, check_fits, join

        join(check_cluster(task.ray_address))  # before the run exists: nothing half-started
        check_fits(task.shard_cpus, task.shard_memory_bytes, dict(task.resources))
    return task, shards
