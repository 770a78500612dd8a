"""Acting on runs from serve: control requests and the event feed of a live master,
starting and resuming runs through the same ``python -m orchestrator`` a user would
type (detached), and the tasks of orch.toml a front end may start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from orchestrator import control
from orchestrator.configfile import load_config
from orchestrator.errors import MasterUnreachable, OrchError
from orchestrator.serve.data.runs import REDACTED


def send(control_endpoint: str, op: str, **fields: Any) -> dict[str, Any]:
    """One control request to a live master; MasterUnreachable when it does not answer."""
    return control.request(control_endpoint, op, **fields)


def follow_events(control_endpoint: str) -> Iterator[dict[str, Any]]:
    """The master's state changes until its run ends; MasterUnreachable when it dies."""
    reply = control.request(control_endpoint, "subscribe")
    if not reply.get("ok") or not isinstance(reply.get("events"), str):
        raise MasterUnreachable(f"the master at {control_endpoint} refused to subscribe")
    yield from control.follow_events(reply["events"], control_endpoint)


def _orch(
    args: list[str], home: str, timeout_s: float, cwd: str | None = None
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_HOME"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--home", home],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env=env,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].removeprefix("orch: ") if lines else ""


class StartFailed(OrchError):
    """Raised when ``orch run -d`` or ``orch resume -d`` refused or failed."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def start_task(config_path: str, name: str, home: str, timeout_s: float = 30.0) -> str:
    """``orch run NAME --config FILE -d``: the new run's id."""
    code, out, err = _orch(
        ["run", name, "--config", config_path, "-d"],
        home,
        timeout_s,
        cwd=os.path.dirname(config_path) or None,
    )
    if code != 0:
        raise StartFailed(_last_line(err) or f"orch run exited {code}", usage=code == 2)
    return _last_line(out)


def resume_run(run_id: str, home: str, timeout_s: float = 30.0) -> None:
    """``orch resume RUN -d``."""
    code, _, err = _orch(["resume", run_id, "-d"], home, timeout_s)
    if code != 0:
        raise StartFailed(_last_line(err) or f"orch resume exited {code}", usage=code == 2)


def task_list(config_path: str) -> list[dict[str, Any]]:
    """The tasks of orch.toml a front end may start (env values redacted)."""
    cfg = load_config(config_path)
    out = []
    for name, table in cfg.tasks.items():
        item: dict[str, Any] = {"name": name}
        for key in ("command", "call", "shards", "split", "range", "jobs", "restart"):
            if key in table:
                item[key] = table[key]
        if isinstance(table.get("env"), dict):
            item["env"] = {k: REDACTED for k in table["env"]}
        out.append(item)
    return out


def check_config(config_path: str) -> None:
    """A missing or broken orch.toml is a one-line error (``OrchError``) now, not at a POST."""
    load_config(config_path)


def task_names(config_path: str) -> list[str]:
    return list(load_config(config_path).tasks)
