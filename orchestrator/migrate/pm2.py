"""pm2 ecosystem files -> orch tasks: every ``apps[]`` entry, the rest as comments."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from typing import Any

import orjson

from orchestrator.errors import ConfigError, OrchError
from orchestrator.migrate.toml_out import Task, render, toml_value
from orchestrator.migrate.util import braces, duration, task_name
from orchestrator.units import parse_size

__all__ = ["apps_of", "convert", "evaluate_js"]

#: pm2 picks an interpreter from the script's extension.
_INTERPRETERS = {
    ".js": "node",
    ".cjs": "node",
    ".mjs": "node",
    ".py": "python",
    ".sh": "bash",
    ".php": "php",
    ".rb": "ruby",
    ".pl": "perl",
    ".coffee": "coffee",
    ".ts": "ts-node",
}
_NOTES = {
    "exec_mode": "orch runs independent processes; there is no shared-port cluster mode",
    "watch": "orch does not restart on file changes",
    "ignore_watch": "orch does not restart on file changes",
    "watch_options": "orch does not restart on file changes",
    "log_file": "orch writes per-shard logs under the run directory",
    "out_file": "orch writes each shard's stdout to <run>/logs/<index>-<id>.out",
    "error_file": "orch writes each shard's stderr to <run>/logs/<index>-<id>.err",
    "merge_logs": "`orch logs RUN` interleaves all shards with a prefix",
    "combine_logs": "`orch logs RUN` interleaves all shards with a prefix",
    "log_date_format": "orch timestamps every log line itself",
    "pid_file": "orch records pids in the run's state database",
    "listen_timeout": "orch has no ready signal; use heartbeats (docs/protocol.md)",
    "wait_ready": "orch has no ready signal; use heartbeats (docs/protocol.md)",
    "shutdown_with_message": "orch stops with SIGTERM, then SIGKILL after stop_timeout",
    "stop_exit_codes": "orch treats exit 0 as done and any other exit as a failure",
    "source_map_support": "a node option; add it to the command if needed",
    "instance_var": "orch gives each shard its index as {index} (used for NODE_APP_INSTANCE)",
    "vizion": "no version metadata in orch",
    "post_update": "orch has no deploy hooks",
    "force": "orch never starts a second live run of a task by accident",
    "namespace": "orch has no namespaces; task names are unique per orch.toml",
    "filter_env": "orch passes the environment of the shell that runs it",
    "append_env_to_name": "orch names runs with --name",
    "time": "orch timestamps every log line itself",
    "treekill": "orch always signals the whole process group",
    "increment_var": "use {index} in env values instead",
    "min_uptime": "mapped to backoff_reset",
    "kill_timeout": "mapped to stop_timeout",
}
_NODE_EVAL = r"""
const path = require('path');
const file = path.resolve(process.argv[1]);
(async () => {
  let mod;
  try { mod = require(file); }
  catch (e) {
    if (e && (e.code === 'ERR_REQUIRE_ESM' || e instanceof SyntaxError)) {
      mod = await import(require('url').pathToFileURL(file).href);
    } else { throw e; }
  }
  if (mod && mod.default !== undefined && mod.apps === undefined) mod = mod.default;
  process.stdout.write(JSON.stringify(mod === undefined ? null : mod));
})().catch((e) => { process.stderr.write(String((e && e.message) || e)); process.exit(1); });
"""


def evaluate_js(path: str, shown: str, node: str | None = None) -> Any:
    """Run ``node`` to evaluate a .js/.cjs/.mjs ecosystem file; its exports as JSON."""
    exe = node or shutil.which("node")
    if exe is None:
        raise ConfigError(
            f"{shown}: a JavaScript ecosystem file needs node to be read, and node is not"
            " installed (install node, or convert the file to JSON: "
            "node -e \"console.log(JSON.stringify(require('./FILE')))\")"
        )
    try:
        done = subprocess.run(
            [exe, "-e", _NODE_EVAL, path],
            capture_output=True,
            timeout=30,
            cwd=os.path.dirname(os.path.abspath(path)),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{shown}: cannot evaluate with node ({exc})") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(f"{shown}: node could not evaluate it ({why[0] if why else 'failed'})")
    try:
        return orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        raise ConfigError(f"{shown}: node gave no JSON for its exports") from None


def apps_of(doc: Any) -> list[Any] | None:
    """The ``apps`` list of an ecosystem document (or a bare list of apps), else None."""
    if isinstance(doc, dict) and isinstance(doc.get("apps"), list):
        return list(doc["apps"])
    if isinstance(doc, dict) and isinstance(doc.get("apps"), dict):
        return [doc["apps"]]
    if isinstance(doc, list) and doc and all(isinstance(a, dict) and "script" in a for a in doc):
        return list(doc)
    return None


def convert(apps: list[Any], source: str, doc: Any) -> str:
    tasks: list[Task] = []
    notes: list[str] = []
    names: set[str] = set()
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ConfigError(f"{source}: apps[{i}] must be an object")
        tasks.append(_app(app, i, names, source))
    if isinstance(doc, dict):
        for key in doc:
            if key != "apps":
                notes.append(
                    f"{key}: not imported (pm2 deploy and other sections have no orch equivalent)"
                )
    return render(os.path.basename(source), "pm2 ecosystem file", tasks, notes)


def _app(app: dict[str, Any], i: int, names: set[str], source: str) -> Task:
    opts = dict(app)
    raw_name = opts.pop("name", None)
    script = opts.pop("script", None)
    if not isinstance(script, str) or not script:
        raise ConfigError(f"{source}: apps[{i}] has no script")
    name = (
        raw_name
        if isinstance(raw_name, str) and raw_name
        else os.path.splitext(os.path.basename(script))[0]
    )
    task = Task(task_name(name, names))
    if task.name != name:
        task.note(f"app {name!r} is named {task.name!r}: orch task names are simpler")
    task.keys["command"] = _command(script, opts, task)
    instances = opts.pop("instances", 1)
    if instances in ("max", 0, -1, "0", "-1"):
        count = os.cpu_count() or 1
        task.note(
            f"instances = {instances!r}: one per CPU, {count} on the machine that imported it"
        )
        instances = count
    try:
        count = int(instances)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: apps[{i}] instances: expected a number or 'max'") from None
    if count < 0:
        count = max(1, (os.cpu_count() or 1) + count)
        task.note(f"instances = {instances}: all CPUs but {-int(instances)}")
    task.keys["split"] = max(1, count)
    # pm2 starts every app of the file with it: `autostart: true` said outright becomes
    # an orch service (`orch serve` starts it when it starts); unsaid, `orch run` does.
    autostart = opts.pop("autostart", None)
    if autostart is True:
        task.keys["autostart"] = True
    elif autostart is not None:
        task.note(f"autostart = {autostart}: orch starts this task only when asked (orch run)")
    autorestart = opts.pop("autorestart", True)
    task.keys["restart"] = "always" if autorestart else "never"
    if "max_restarts" in opts:
        task.keys["max_restarts"] = _count(opts.pop("max_restarts"), "max_restarts", i, source)
    if "min_uptime" in opts:
        task.keys["backoff_reset"] = _ms_or_text(opts.pop("min_uptime"))
    delay = opts.pop("restart_delay", None)
    expo = opts.pop("exp_backoff_restart_delay", None)
    if expo is not None:
        task.keys["backoff_initial"] = _ms_or_text(expo)
        task.keys["backoff_factor"] = 1.5
        task.keys["backoff_max"] = "15s"
        if delay is not None:
            task.note(f"restart_delay = {delay}: exp_backoff_restart_delay wins, as in pm2")
    elif delay is not None:
        task.keys["backoff_initial"] = _ms_or_text(delay)
        task.keys["backoff_max"] = _ms_or_text(delay)
        task.keys["backoff_factor"] = 1.0
        task.keys["backoff_jitter"] = 0.0
    if "kill_timeout" in opts:
        task.keys["stop_timeout"] = _ms_or_text(opts.pop("kill_timeout"))
    memory = opts.pop("max_memory_restart", None)
    if memory is not None:
        try:
            parse_size(memory, where="max_memory_restart")
            task.keys["max_memory"] = str(memory)
        except OrchError as exc:
            task.note(f"max_memory_restart = {memory!r}: not a size orch reads ({exc})")
    cwd = opts.pop("cwd", None)
    if isinstance(cwd, str) and cwd:
        task.keys["cwd"] = braces(cwd)
    cron = opts.pop("cron_restart", None)
    if isinstance(cron, str) and cron.strip():
        fields = cron.split()
        if len(fields) == 5:
            task.keys["schedule"] = cron.strip()
            task.keys["overlap"] = "replace"
            task.note("cron_restart: `orch serve` fires the schedule, replacing the live run")
        else:
            task.note(f"cron_restart = {cron!r}: orch schedules take five cron fields")
    env = opts.pop("env", None)
    if isinstance(env, dict):
        for key, value in env.items():
            task.env[str(key)] = _env_value(value)
    if count > 1 or instances != 1:
        task.env.setdefault("NODE_APP_INSTANCE", "{index}")
    for key in sorted(opts):
        value = opts[key]
        if key.startswith("env_"):
            task.note(f"{key}: pm2 --env {key[4:]} variables are not imported (use another task)")
        elif key in ("interpreter", "interpreter_args", "node_args", "args"):
            continue
        else:
            why = _NOTES.get(key, "no orch equivalent")
            task.note(f"{key} = {_show(value)}: {why}")
    return task


def _command(script: str, opts: dict[str, Any], task: Task) -> list[str]:
    args = opts.pop("args", None)
    if isinstance(args, str):
        argv = shlex.split(args)
    elif isinstance(args, list):
        argv = [str(a) for a in args]
    else:
        argv = []
    interpreter = opts.pop("interpreter", None) or opts.pop("exec_interpreter", None)
    inter_args = opts.pop("interpreter_args", None) or opts.pop("node_args", None)
    if isinstance(inter_args, str):
        extra = shlex.split(inter_args)
    elif isinstance(inter_args, list):
        extra = [str(a) for a in inter_args]
    else:
        extra = []
    if interpreter is None:
        interpreter = _INTERPRETERS.get(os.path.splitext(script)[1].lower())
    parts = (
        [script, *argv] if interpreter in (None, "none") else [interpreter, *extra, script, *argv]
    )
    return [braces(p) for p in parts]


def _ms_or_text(value: Any) -> Any:
    """pm2 times are milliseconds as numbers, or strings like '10s'."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return duration(value / 1000)
    if isinstance(value, str) and value.strip().isdigit():
        return duration(int(value) / 1000)
    return value


def _count(value: Any, key: str, i: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: apps[{i}] {key}: expected an integer >= 0")
    return value


def _env_value(value: Any) -> str:
    if isinstance(value, str):
        return braces(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return braces(
        orjson.dumps(value).decode() if not isinstance(value, int | float) else str(value)
    )


def _show(value: Any) -> str:
    text = (
        toml_value(value)
        if isinstance(value, str | int | float | bool)
        else orjson.dumps(value).decode()
    )
    return text if len(text) <= 80 else text[:77] + "..."
