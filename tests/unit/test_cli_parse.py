"""The command line's contract, checked without processes: ``cli.main(argv)`` in this
process, with the command implementations replaced by recorders.

What each command hands to its implementation (names, values, types, None defaults),
the one-line usage errors (exit 2), ``--`` and interspersed arguments of ``orch run``,
help, version and the group without a subcommand.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import __version__, cli

Calls = list[tuple[str, tuple[Any, ...], dict[str, Any]]]

#: ``orch run`` with no option at all: what ``launch.run_command`` receives as opts.
RUN_DEFAULTS: dict[str, Any] = {
    "shards_path": None,
    "fmt": None,
    "split": None,
    "range_": None,
    "config_path": None,
    "jobs": None,
    "restart": None,
    "max_restarts": None,
    "stop_timeout": None,
    "backoff_initial": None,
    "backoff_max": None,
    "backoff_reset": None,
    "heartbeat_interval": None,
    "heartbeat_timeout": None,
    "stall_timeout": None,
    "require_heartbeat": None,
    "max_memory": None,
    "env": (),
    "cwd": None,
    "shell": None,
    "backend": None,
    "ray_address": None,
    "shard_cpus": None,
    "shard_memory": None,
    "name": None,
    "allow_concurrent": False,
    "final_exit_codes": None,
    "max_failed": None,
    "verbose": False,
    "detach": False,
    "home": None,
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Every command's implementation records its arguments and returns a known code."""
    import orchestrator.launch
    import orchestrator.migrate
    import orchestrator.notify.command
    import orchestrator.prune
    import orchestrator.serve.main
    import orchestrator.serve.ops
    import orchestrator.steer
    import orchestrator.views.logs
    import orchestrator.views.status

    got: Calls = []

    def recorder(name: str, code: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            got.append((name, args, kwargs))
            return code

        return record

    targets: list[tuple[Any, str, str, Any]] = [
        (orchestrator.launch, "run_command", "run", 5),
        (orchestrator.views.status, "status", "status", 0),
        (orchestrator.views.logs, "logs", "logs", 0),
        (orchestrator.serve.main, "serve", "serve", 0),
        (orchestrator.serve.main, "systemd_unit", "systemd_unit", "[Unit]\nX=1\n"),
        (orchestrator.serve.ops, "schedules_command", "schedules", 0),
        (orchestrator.migrate, "import_file", "import", "a = 1\n"),
        (orchestrator.prune, "gc_command", "gc", 0),
        (orchestrator.notify.command, "notify_test", "notify_test", 1),
    ]
    for name in ("stop", "restart", "scale", "wait", "resume", "events"):
        targets.append((orchestrator.steer, name, name, 6))
    for module, attr, name, code in targets:
        monkeypatch.setattr(module, attr, recorder(name, code))
    return got


def orch(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``orch ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_call(calls: Calls) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    assert len(calls) == 1, calls
    return calls[0]


# --- orch run --------------------------------------------------------------------------------


def test_run_without_options_hands_over_every_key_with_its_default(
    calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = orch(capsys, "run", "crawl")
    assert (code, out, err) == (5, "", "")
    name, args, kwargs = one_call(calls)
    assert name == "run" and kwargs == {}
    head, command, opts = args
    assert (head, command) == ("crawl", ())
    assert opts == RUN_DEFAULTS
    # None, not False: "not given" lets orch.toml decide
    assert opts["require_heartbeat"] is None and opts["shell"] is None
    assert opts["env"] == () and isinstance(opts["env"], tuple)


def test_run_every_option_long_form(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--shards", "s.csv", "--format", "csv", "--split", "3", "--range", "1..2",
        "--config", "o.toml", "--jobs", "2", "--restart", "never", "--max-restarts", "1",
        "--stop-timeout", "1s", "--backoff-initial", "1s", "--backoff-max", "2s",
        "--backoff-reset", "3s", "--heartbeat-interval", "4s", "--heartbeat-timeout", "5s",
        "--stall-timeout", "6s", "--require-heartbeat", "--max-memory", "1G", "--env", "A=1",
        "--cwd", "d", "--shell", "--backend", "ray", "--ray-address", "h:1",
        "--shard-cpus", "2", "--shard-memory", "1G", "--name", "n", "--allow-concurrent",
        "--final-exit-codes", "4,44", "--max-failed", "3", "--verbose", "--detach",
        "--home", "h",
    ]  # fmt: skip
    code, _, err = orch(capsys, "run", "task", *argv, "--", "cmd", "x")
    assert (code, err) == (5, "")
    _, (head, command, opts), _ = one_call(calls)
    assert (head, command) == ("task", ("cmd", "x"))
    assert opts == {
        "shards_path": "s.csv", "fmt": "csv", "split": 3, "range_": "1..2",
        "config_path": "o.toml", "jobs": 2, "restart": "never", "max_restarts": 1,
        "stop_timeout": "1s", "backoff_initial": "1s", "backoff_max": "2s",
        "backoff_reset": "3s", "heartbeat_interval": "4s", "heartbeat_timeout": "5s",
        "stall_timeout": "6s", "require_heartbeat": True, "max_memory": "1G", "env": ("A=1",),
        "cwd": "d", "shell": True, "backend": "ray", "ray_address": "h:1", "shard_cpus": 2.0,
        "shard_memory": "1G", "name": "n", "allow_concurrent": True,
        "final_exit_codes": "4,44", "max_failed": 3, "verbose": True, "detach": True,
        "home": "h",
    }  # fmt: skip
    assert isinstance(opts["shard_cpus"], float) and isinstance(opts["split"], int)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-j", "3"], {"jobs": 3}),
        (["-j3"], {"jobs": 3}),
        (["--jobs=4"], {"jobs": 4}),
        (["-v", "-d"], {"verbose": True, "detach": True}),
        (["-vd"], {"verbose": True, "detach": True}),
        (["-vj", "7"], {"verbose": True, "jobs": 7}),
        (["-vj7"], {"verbose": True, "jobs": 7}),
        (["--split=-3"], {"split": -3}),  # checked later, with the flag's name
        (["--stop-timeout", "-1"], {"stop_timeout": "-1"}),
        (["--range", "-5..3"], {"range_": "-5..3"}),  # a value may start with '-'
        (["--name", "-x"], {"name": "-x"}),
        (["--split", "1", "--split", "2"], {"split": 2}),  # the last one wins
        (["--shell", "--shell"], {"shell": True}),
        (["--env", "A=1", "--env=B=2", "--env", "C"], {"env": ("A=1", "B=2", "C")}),
        (["--shard-cpus", "1"], {"shard_cpus": 1.0}),
        (["--format=jsonl", "--restart", "always", "--backend", "local"],
         {"fmt": "jsonl", "restart": "always", "backend": "local"}),
    ],
)  # fmt: skip
def test_run_option_forms(
    calls: Calls, capsys: pytest.CaptureFixture[str], argv: list[str], expected: dict[str, Any]
) -> None:
    code, _, err = orch(capsys, "run", *argv)
    assert (code, err) == (5, "")
    _, (head, command, opts), _ = one_call(calls)
    assert (head, command) == (None, ())
    assert opts == {**RUN_DEFAULTS, **expected}


@pytest.mark.parametrize(
    ("argv", "head", "command", "changed"),
    [
        # options before and after the TASK
        (["--split", "4", "crawl", "-j", "2"], "crawl", (), {"split": 4, "jobs": 2}),
        (["crawl", "--split", "4"], "crawl", (), {"split": 4}),
        # after '--' nothing is parsed: the command verbatim
        (["--split", "2", "--", "php", "x.php", "--split={count}", "-v"], None,
         ("php", "x.php", "--split={count}", "-v"), {"split": 2}),
        (["crawl", "-v", "--", "--help", "--", "-j"], "crawl", ("--help", "--", "-j"),
         {"verbose": True}),
        (["--", "--split", "3"], None, ("--split", "3"), {}),
        (["--"], None, (), {}),
        (["--", "--"], None, ("--",), {}),
        (["-", "--", "x"], "-", ("x",), {}),
        (["a:b"], "a:b", (), {}),
    ],
)  # fmt: skip
def test_run_task_and_command(
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    head: str | None,
    command: tuple[str, ...],
    changed: dict[str, Any],
) -> None:
    code, _, err = orch(capsys, "run", *argv)
    assert (code, err) == (5, "")
    _, args, _ = one_call(calls)
    assert args == (head, command, {**RUN_DEFAULTS, **changed})


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--jobs", "many"], "Invalid value for '-j' / '--jobs': 'many' is not a valid integer. "
         "(orch run --help)"),
        (["--jobs", "4.0"], "Invalid value for '-j' / '--jobs': '4.0' is not a valid integer. "
         "(orch run --help)"),
        (["--split", "x"], "Invalid value for '--split': 'x' is not a valid integer. "
         "(orch run --help)"),
        (["--shard-cpus", "x"], "Invalid value for '--shard-cpus': 'x' is not a valid float. "
         "(orch run --help)"),
        (["--format", "CSV"], "Invalid value for '--format': 'CSV' is not one of 'csv', 'tsv', "
         "'jsonl', 'text'. (orch run --help)"),
        (["--restart", "sometimes"], "Invalid value for '--restart': 'sometimes' is not one of "
         "'on-failure', 'always', 'never'. (orch run --help)"),
        (["--backend", "k8s"], "Invalid value for '--backend': 'k8s' is not one of 'local', "
         "'ray'. (orch run --help)"),
        (["--jobs"], "Option '--jobs' requires an argument."),
        (["-j"], "Option '-j' requires an argument."),
        (["--detach=1"], "Option '--detach' does not take a value."),
        (["--bogus"], "No such option '--bogus'. (Did you mean one of: '--jobs', '--verbose'?) "
         "(orch run --help)"),
        (["--jbs", "3"], "No such option '--jbs'. Did you mean '--jobs'? (orch run --help)"),
        (["--spl", "3"], "No such option '--spl'. (Did you mean one of: '--shell', '--split'?) "
         "(orch run --help)"),
        (["-vx"], "No such option '-x'. (orch run --help)"),
        (["--version"], "No such option '--version'. Did you mean '--verbose'? "
         "(orch run --help)"),
        # the first mistake on the line: an unknown option before any bad value
        (["--jobs", "x", "--bogus"], "No such option '--bogus'. (Did you mean one of: '--jobs', "
         "'--verbose'?) (orch run --help)"),
        (["--split", "y", "--jobs", "x"], "Invalid value for '--split': 'y' is not a valid "
         "integer. (orch run --help)"),
        (["a", "b", "--", "c"], "unexpected arguments 'b': put the command after '--' "
         "(orch run --split 4 -- ./job.sh {index})"),
    ],
)  # fmt: skip
def test_run_usage_errors_are_one_line_exit_2(
    calls: Calls, capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    code, out, err = orch(capsys, "run", *argv)
    assert (code, out, err) == (2, "", f"orch: {line}\n")
    assert calls == []


# --- the other commands -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "call"),
    [
        (["status"], 0, ("status", (None,), {"as_json": False, "show_all": False, "home": None})),
        (["status", "--all", "--json", "r", "--home", "h"], 0,
         ("status", ("r",), {"as_json": True, "show_all": True, "home": "h"})),
        (["logs", "r"], 0, ("logs", ("r",), {
            "shard": None, "stdout": False, "stderr": False, "protocol": False, "tail": None,
            "follow": False, "home": None})),
        (["logs", "r", "--shard", "s", "--stdout", "--stderr", "--protocol", "-n", "5", "-f",
          "--home", "h"], 0, ("logs", ("r",), {
            "shard": "s", "stdout": True, "stderr": True, "protocol": True, "tail": 5,
            "follow": True, "home": "h"})),
        (["logs", "r", "-fn", "5"], 0, ("logs", ("r",), {
            "shard": None, "stdout": False, "stderr": False, "protocol": False, "tail": 5,
            "follow": True, "home": None})),
        (["logs", "r", "--tail", "-5", "--follow"], 0, ("logs", ("r",), {
            "shard": None, "stdout": False, "stderr": False, "protocol": False, "tail": -5,
            "follow": True, "home": None})),
        (["stop", "r"], 6, ("stop", ("r", None, None), {})),
        (["stop", "--shard", "s", "r", "--home", "h"], 6, ("stop", ("r", "s", "h"), {})),
        (["restart", "r"], 6, ("restart", ("r", None, None), {"rolling": None})),
        (["restart", "r", "--shard", "s", "--rolling=3", "--home", "h"], 6,
         ("restart", ("r", "s", "h"), {"rolling": 3})),
        (["restart", "r", "--rolling", "9223372036854775807"], 6,
         ("restart", ("r", None, None), {"rolling": 2**63 - 1})),
        (["scale", "r", "-j", "3"], 6, ("scale", ("r", 3, None), {})),
        (["scale", "--home", "h", "r", "--jobs=1"], 6, ("scale", ("r", 1, "h"), {})),
        (["scale", "r", "-j3"], 6, ("scale", ("r", 3, None), {})),
        (["wait", "r"], 6, ("wait", ("r", None, None), {})),
        (["wait", "r", "--home", "h", "--timeout", "5m"], 6, ("wait", ("r", "h", 300.0), {})),
        (["resume", "r"], 6, ("resume", ("r", None, False, False, False, None), {})),
        (["resume", "r", "-d", "-v", "--retry-failed", "--env", "A=1", "--env", "B=x=y",
          "--home", "h"], 6, ("resume", ("r", "h", True, True, True, {"A": "1", "B": "x=y"}), {})),
        (["resume", "r", "-dv", "--env", "A="], 6,
         ("resume", ("r", None, True, True, False, {"A": ""}), {})),
        (["events", "r", "--home", "h"], 6, ("events", ("r", "h"), {})),
        (["serve"], 0, ("serve", (), {
            "host": "127.0.0.1", "port": 9001, "config": None, "home": None, "token": None,
            "read_only": False, "no_auth": False})),
        (["serve", "--host", "0.0.0.0", "--port", "80", "--config", "c", "--token", "t",
          "--read-only", "--no-auth", "--home", "h"], 0, ("serve", (), {
            "host": "0.0.0.0", "port": 80, "config": "c", "home": "h", "token": "t",
            "read_only": True, "no_auth": True})),
        (["schedules"], 0, ("schedules", (None, None, False), {})),
        (["schedules", "--config", "c", "--json", "--home", "h"], 0,
         ("schedules", ("c", "h", True), {})),
        (["gc"], 0, ("gc", (None, None, None, False), {})),
        (["gc", "--keep", "3", "--older-than", "2d", "-n", "--home", "h"], 0,
         ("gc", ("h", 3, "2d", True), {})),
        (["gc", "--dry-run"], 0, ("gc", (None, None, None, True), {})),
        (["notify", "test", "c"], 1, ("notify_test", ("c", None), {})),
        (["notify", "test", "--config", "f", "c"], 1, ("notify_test", ("c", "f"), {})),
        (["import", "-"], 0, ("import", ("-",), {})),
    ],
)  # fmt: skip
def test_command_arguments_reach_the_implementation(
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    call: tuple[str, tuple[Any, ...], dict[str, Any]],
) -> None:
    got_code, out, err = orch(capsys, *argv)
    assert (got_code, err) == (code, "")
    assert one_call(calls) == call
    for value in (*call[1], *call[2].values()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert any(type(v) is type(value) for v in (*calls[0][1], *calls[0][2].values()))


def test_serve_prints_the_systemd_unit_without_an_extra_newline(
    calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = orch(
        capsys, "serve", "--print-systemd-unit", "--port", "9", "--token", "t", "--home", "h"
    )
    assert (code, out, err) == (0, "[Unit]\nX=1\n", "")
    assert one_call(calls) == ("systemd_unit", (), {
        "host": "127.0.0.1", "port": 9, "config": None, "home": "h", "read_only": False,
        "no_auth": False, "token_given": True})  # fmt: skip


def test_import_prints_without_an_extra_newline(
    calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    assert orch(capsys, "import", "f.conf") == (0, "a = 1\n", "")
    assert one_call(calls) == ("import", ("f.conf",), {})


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["logs"], "Missing argument 'RUN'. (orch logs --help)"),
        (["logs", "--home=h"], "Missing argument 'RUN'. (orch logs --help)"),
        (["logs", "r", "-n", "x"], "Invalid value for '-n' / '--tail': 'x' is not a valid "
         "integer. (orch logs --help)"),
        (["logs", "-n", "x"], "Invalid value for '-n' / '--tail': 'x' is not a valid integer. "
         "(orch logs --help)"),
        (["logs", "r", "--tail"], "Option '--tail' requires an argument."),
        (["status", "r", "s"], "Got unexpected extra argument (s) (orch status --help)"),
        (["status", "x", "y", "z"], "Got unexpected extra arguments (y z) (orch status --help)"),
        (["status", "--json=1"], "Option '--json' does not take a value."),
        (["status", "--hom", "h"], "No such option '--hom'. Did you mean '--home'? "
         "(orch status --help)"),
        (["stop", "r", "--shard"], "Option '--shard' requires an argument."),
        (["restart", "r", "--rolling", "0"], "Invalid value for '--rolling': 0 is not in the "
         "range 1<=x<=9223372036854775807. (orch restart --help)"),
        (["restart", "r", "--rolling", "x"], "Invalid value for '--rolling': 'x' is not a "
         "valid integer range. (orch restart --help)"),
        (["scale", "r"], "Missing option '-j' / '--jobs'. (orch scale --help)"),
        (["scale", "-j", "3"], "Missing argument 'RUN'. (orch scale --help)"),
        (["scale", "r", "-j", "0"], "Invalid value for '-j' / '--jobs': 0 is not in the range "
         "1<=x<=9223372036854775807. (orch scale --help)"),
        (["scale", "r", "--jobs=9223372036854775808"], "Invalid value for '-j' / '--jobs': "
         "9223372036854775808 is not in the range 1<=x<=9223372036854775807. "
         "(orch scale --help)"),
        (["scale", "x", "y", "z"], "Missing option '-j' / '--jobs'. (orch scale --help)"),
        (["wait", "r", "--timeout", "bad"], "--timeout: invalid duration 'bad' (use seconds or "
         "e.g. '500ms', '30s', '5m', '1h')"),
        (["resume", "r", "--env", "bad"], "--env: expected KEY=VALUE, got 'bad'"),
        (["serve", "--port", "x"], "Invalid value for '--port': 'x' is not a valid integer. "
         "(orch serve --help)"),
        (["serve", "x"], "Got unexpected extra argument (x) (orch serve --help)"),
        (["gc", "-n", "x"], "Got unexpected extra argument (x) (orch gc --help)"),
        (["import"], "Missing argument 'FILE'. (orch import --help)"),
        (["import", "--home", "h", "f"], "No such option '--home'. Did you mean '--help'? "
         "(orch import --help)"),
        (["events", "r", "r2"], "Got unexpected extra argument (r2) (orch events --help)"),
        (["notify", "test"], "Missing argument 'CHANNEL'. (orch notify test --help)"),
        (["notify", "x"], "No such command 'x'. (orch notify --help)"),
        (["notify", "--bogus"], "No such option '--bogus'. (orch notify --help)"),
        (["nope"], "No such command 'nope'."),
        (["--bogus"], "No such option '--bogus'."),
        (["-x"], "No such option '-x'."),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_exit_2(
    calls: Calls, capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    code, out, err = orch(capsys, *argv)
    assert (code, out, err) == (2, "", f"orch: {line}\n")
    assert calls == []


# --- help, version, groups --------------------------------------------------------------------

COMMANDS = [
    "run", "status", "logs", "stop", "restart", "scale", "wait", "resume", "events", "serve",
    "schedules", "import", "gc", "notify", "notify test",
]  # fmt: skip


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(
    calls: Calls, capsys: pytest.CaptureFixture[str], command: str, flag: str
) -> None:
    code, out, err = orch(capsys, *command.split(), flag)
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: orch {command} [OPTIONS]")
    assert "  -h, --help  " in out or "  -h, --help" in out.splitlines()[-1]
    assert calls == []


def test_help_beats_a_bad_value_but_not_an_unknown_option(
    calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = orch(capsys, "run", "--jobs", "x", "--help")
    assert (code, err) == (0, "") and out.startswith("Usage: orch run [OPTIONS] [ARGS]...")
    code, out, err = orch(capsys, "run", "--help", "--bogus")
    assert (code, out) == (2, "") and err.startswith("orch: No such option '--bogus'.")
    assert calls == []


def test_run_help_lists_each_option_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = orch(capsys, "run", "--help")
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        "Usage: orch run [OPTIONS] [ARGS]...",
        "",
        "  Run a task once per shard: orch run [TASK] [OPTIONS] [-- COMMAND...]",
    ]
    for row in [
        "  --shards FILE                   Shard list: CSV, JSON lines or text.",
        "  --format [csv|tsv|jsonl|text]   Shard list format (default: from the file",
        "  -j, --jobs K                    At most K shards run at once.",
        "  --restart [on-failure|always|never]",
        "  --require-heartbeat",
        "  --env KEY=VALUE                 Extra environment (templated).",
        "  -v, --verbose                   Stream child output, prefixed by shard id.",
        "  -d, --detach                    Run in the background; print the run id.",
        "  -h, --help                      Show this message and exit.",
    ]:
        assert row in lines, row


def test_serve_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = orch(capsys, "serve", "--help")
    assert "  --host TEXT           Address to listen on.  [default: 127.0.0.1]" in out
    assert "  --port INTEGER        Port (0 picks a free one).  [default: 9001]" in out


@pytest.mark.parametrize("argv", [[], ["notify"]], ids=["orch", "notify"])
def test_a_group_without_a_subcommand_prints_its_help_and_exits_2(
    calls: Calls, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = orch(capsys, *argv)
    assert (code, err) == (2, "")
    assert out.startswith(f"Usage: {' '.join(['orch', *argv])} [OPTIONS] COMMAND [ARGS]...\n")
    assert "\nCommands:\n" in out
    _, help_out, _ = orch(capsys, *argv, "--help")
    assert out == help_out
    assert calls == []


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = orch(capsys, "--help")
    commands = out.split("\nCommands:\n")[1].splitlines()
    assert [line.split()[0] for line in commands] == sorted(c for c in COMMANDS if " " not in c)
    assert "  run        Run a task once per shard: orch run [TASK] [OPTIONS] [--..." in commands
    assert "  --version   Show the version and exit." in out


@pytest.mark.parametrize("argv", [["--version"], ["--version", "run"]])
def test_version(calls: Calls, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert orch(capsys, *argv) == (0, f"orch, version {__version__}\n", "")
    assert calls == []


# --- errors raised by a command ---------------------------------------------------------------


def test_an_interrupted_command_says_aborted_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import orchestrator.steer

    def interrupted(*args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator.steer, "events", interrupted)
    assert orch(capsys, "events", "r") == (130, "", "\norch: aborted\n")


def test_an_orch_error_is_one_line_with_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import orchestrator.steer
    from orchestrator.errors import OrchError

    class Unreachable(OrchError):
        exit_code = 3

    def unreachable(*args: Any) -> int:
        raise Unreachable("run r: master not reachable")

    monkeypatch.setattr(orchestrator.steer, "stop", unreachable)
    assert orch(capsys, "stop", "r") == (3, "", "orch: run r: master not reachable\n")


# --- orch notify test: what it prints --------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code", "out", "err"),
    [
        ({"ok": True, "status": 200, "text": "ok"}, 0, "hook (webhook): delivered, HTTP 200: ok\n",
         ""),
        ({"ok": False, "status": 500, "text": "it \x1b[31mbroke\x1b[0m", "reason": "HTTP 500"}, 1,
         "", "hook (webhook): not delivered, HTTP 500: it broke\n"),
        ({"ok": False, "reason": "refused"}, 1, "",
         "hook (webhook): not delivered, refused: (empty body)\n"),
    ],
)  # fmt: skip
def test_notify_test_prints_the_receivers_answer(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
    answer: dict[str, Any],
    code: int,
    out: str,
    err: str,
) -> None:
    import orchestrator.notify.command
    from orchestrator.notify.send import Answer

    sent: list[tuple[Any, ...]] = []

    def post(kind: Any, url: str, body: dict[str, Any], **kwargs: Any) -> Answer:
        sent.append((str(kind), url, body["text"]))
        return Answer(**answer)

    monkeypatch.setattr(orchestrator.notify.command, "post", post)
    (tmp_path / "orch.toml").write_text(
        '[notify.hook]\nkind = "webhook"\nurl = "http://127.0.0.1:9/x"\n'
    )
    monkeypatch.chdir(tmp_path)
    assert orch(capsys, "notify", "test", "hook") == (code, out, err)
    assert sent == [("webhook", "http://127.0.0.1:9/x", "orch: test message for channel hook")]


def test_every_setting_with_a_flag_reaches_orch_run_under_its_name() -> None:
    """settings.cli_overrides reads each setting's flag from run's opts by this name."""
    from orchestrator.settings import SETTINGS

    names = {s.option for s in SETTINGS if s.option is not None}
    assert names and names <= set(RUN_DEFAULTS)
