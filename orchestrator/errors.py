"""The error hierarchy and the exit codes the CLI turns them into.

Every user mistake is an ``OrchError`` whose message is one line naming what
is wrong and where (file, line, field). The CLI prints ``orch: <message>`` on
stderr and exits with the class's ``exit_code``; nothing else is printed, so
a user never sees a traceback for their own mistake.
"""

from __future__ import annotations

#: Every shard of the run ended ``done``.
RET_OK = 0
#: At least one shard failed (gave up) or was stopped.
RET_FAILED = 1
#: Usage or configuration error; nothing was started.
RET_USAGE = 2
#: A control request could not reach the run's master.
RET_UNREACHABLE = 3
#: The foreground run was interrupted with Ctrl-C (128 + SIGINT).
RET_INTERRUPTED = 130


class OrchError(Exception):
    """Raised for any error orch reports to the user as one line."""

    exit_code = RET_USAGE


class UsageError(OrchError):
    """Raised when the command line itself is wrong (bad flag value, missing argument)."""


class ConfigError(OrchError):
    """Raised when orch.toml is malformed, has an unknown key, or a bad value."""


class ShardListError(OrchError):
    """Raised when a shard list cannot be read or a record is invalid (file:line: field)."""


class TemplateError(OrchError):
    """Raised when a command template is malformed or names a field no record has."""


class UnitError(OrchError):
    """Raised when a duration or size cannot be parsed or is out of range."""


class RunNotFound(OrchError):
    """Raised when a RUN argument matches no run id or name in orch's home."""


class MasterUnreachable(OrchError):
    """Raised when a live run's master does not answer on its control socket."""

    exit_code = RET_UNREACHABLE


class SpawnError(Exception):
    """Raised when an attempt cannot be started (executable not found, permission denied).

    ``transient`` marks causes that may pass (out of file descriptors or
    processes): the attempt counts as a failure and is retried with backoff,
    where a missing executable ends the shard at once.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient
