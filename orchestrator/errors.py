"""The error hierarchy and the exit codes the CLI turns them into.

Every user mistake is an ``OrchError`` whose message is one line naming what
is wrong and where (file, line, field). The CLI prints ``orch: <message>`` on
stderr and exits with the class's ``exit_code``; nothing else is printed, so
a user never sees a traceback for their own mistake.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Every shard of the run ended ``done``.
RET_OK = 0
#: At least one shard failed (gave up) or was stopped.
RET_FAILED = 1
#: Usage or configuration error; nothing was started.
RET_USAGE = 2
#: A control request could not reach the run's master.
RET_UNREACHABLE = 3
#: ``orch wait --timeout`` gave up before the run ended (as timeout(1) exits).
RET_TIMEOUT = 124
#: The foreground run was interrupted with Ctrl-C (128 + SIGINT).
RET_INTERRUPTED = 130


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` most likely misspells or abbreviates, or None.

    An abbreviation (``idx`` for ``index``, ``merchant`` for ``merchant_id``:
    the word's letters appear in order in the candidate) beats a mere
    similarity (``idx`` is closer to ``id`` by edit ratio, but nobody means
    ``id`` by it). Among several, the most similar wins.
    """
    names = list(dict.fromkeys(candidates))
    if word in names:
        return word
    import difflib  # only on a mistake: not at every start

    def ratio(candidate: str) -> float:
        return difflib.SequenceMatcher(None, word, candidate).ratio()

    abbreviations = [
        c for c in names if len(c) > len(word) >= 2 and _in_order(word, c) and ratio(c) >= 0.5
    ]
    if abbreviations:
        return max(abbreviations, key=ratio)
    close = difflib.get_close_matches(word, names, n=1)
    return close[0] if close else None


def _in_order(word: str, candidate: str) -> bool:
    letters = iter(candidate.lower())
    return word[0].lower() == candidate[0].lower() and all(ch in letters for ch in word.lower())


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


class WaitTimeout(OrchError):
    """Raised when ``orch wait --timeout`` runs out before the run ends."""

    exit_code = RET_TIMEOUT


class RunLost(OrchError):
    """Raised when a run waited on lost its master (``orch resume`` finishes it)."""

    exit_code = RET_FAILED


class SpawnError(Exception):
    """Raised when an attempt cannot be started (executable not found, permission denied).

    ``transient`` marks causes that may pass (out of file descriptors or
    processes): the attempt counts as a failure and is retried with backoff,
    where a missing executable ends the shard at once.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient
