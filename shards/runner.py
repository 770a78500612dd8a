"""Run a Python callable as a shard: ``python -m shards.runner TARGET``.

TARGET is ``pkg.module:function`` (the attribute may be dotted, e.g.
``mod:Class.method``; the current directory is on sys.path because of
``-m``) or ``@/path/to/task.pkl``, a callable pickled with dill (the
serializer of the ``multiprocess`` package) so closures and lambdas work.

The callable is called with ``shards.info()``. Exit status: 0 when it
returns; 1 when it raises (traceback on stderr); 2 when TARGET cannot be
loaded (one line ``orch: cannot load task '<target>': <reason>``). A
``SystemExit`` raised by the task keeps its own status.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from typing import Any

import shards

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_BAD_TARGET = 2

_USAGE = "usage: python -m shards.runner pkg.module:function | @/path/to/task.pkl"


class LoadError(Exception):
    """Raised when a TARGET names no importable callable; the message is the reason."""


def load(target: str) -> Callable[..., Any]:
    """Resolve TARGET to the callable it names; LoadError says why it cannot."""
    if target.startswith("@"):
        obj = _load_pickle(target[1:])
        shown = "the unpickled object"
    else:
        module_name, sep, attr_path = target.partition(":")
        if not sep or not module_name or not attr_path:
            raise LoadError("expected 'pkg.module:function' or '@/path/to/task.pkl'")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:  # includes ModuleNotFoundError
            raise LoadError(str(exc)) from None
        except SyntaxError as exc:
            raise LoadError(f"{exc.msg} ({exc.filename}, line {exc.lineno})") from None
        for name in attr_path.split("."):
            try:
                obj = getattr(obj, name)
            except AttributeError:
                raise LoadError(f"{module_name!r} has no attribute {attr_path!r}") from None
        shown = repr(attr_path)
    if not callable(obj):
        raise LoadError(f"{shown} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def _load_pickle(path: str) -> Any:
    import dill  # the multiprocess package's serializer; only needed for @targets

    try:
        with open(path, "rb") as f:
            return dill.load(f)
    except OSError as exc:
        raise LoadError(exc.strerror or str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad target
        raise LoadError(f"cannot unpickle: {type(exc).__name__}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Load and run the task; return the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(_USAGE, file=sys.stderr)
        return EXIT_BAD_TARGET
    target = args[0]
    try:
        task = load(target)
    except LoadError as exc:
        print(f"orch: cannot load task {target!r}: {exc}", file=sys.stderr)
        return EXIT_BAD_TARGET
    try:
        task(shards.info())
    except Exception:  # noqa: BLE001 - the task's failure is reported, not hidden
        traceback.print_exc()
        return EXIT_TASK_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
