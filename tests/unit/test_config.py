"""orch.toml parsing, CLI > file > defaults precedence, validation, snapshot round trip."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import (
    KEYS,
    ConfigFile,
    Restart,
    TaskConfig,
    build_task,
    find_config,
    load_config,
)
from orchestrator.errors import ConfigError


def _toml(tmp_path: Path, text: str, name: str = "orch.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _load_error(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def _build(
    overrides: dict[str, Any] | None = None,
    file_task: dict[str, Any] | None = None,
    file_path: str | None = None,
    cwd: str = "/",
    name: str = "crawl",
) -> TaskConfig:
    return build_task(
        name=name, file_task=file_task, file_path=file_path, overrides=overrides or {}, cwd=cwd
    )


def _build_error(
    overrides: dict[str, Any] | None = None,
    file_task: dict[str, Any] | None = None,
    file_path: str | None = None,
    cwd: str = "/",
) -> str:
    with pytest.raises(ConfigError) as info:
        _build(overrides, file_task, file_path, cwd)
    assert "\n" not in str(info.value)
    return str(info.value)


_MIN = {"command": ["python", "x.py"], "split": 2}

# ----------------------------------------------------------------------------- load_config


def test_load_config_reads_task_tables(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[tasks.crawl]
command = ["php", "crawl.php", "{id}"]
shards = "merchants.csv"
stop_timeout = "30s"

[tasks.report]
call = "reports.build:main"
split = 4
""",
    )
    config = load_config(path)
    assert isinstance(config, ConfigFile)
    assert config.path == os.path.abspath(path)
    assert list(config.tasks) == ["crawl", "report"]
    assert config.task("report") == {"call": "reports.build:main", "split": 4}


def test_unknown_task_suggests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, "[tasks.crawl]\nsplit = 1\n[tasks.report]\nsplit = 1\n")
    config = load_config("orch.toml")
    with pytest.raises(ConfigError) as info:
        config.task("crwal")
    assert str(info.value) == (
        "unknown task 'crwal' in orch.toml (known: crawl, report; did you mean 'crawl'?)"
    )
    empty = _toml(tmp_path, "", "empty.toml")
    with pytest.raises(ConfigError, match=r"\(known: none defined\)"):
        load_config(empty).task("x")


def test_unknown_key_names_line_and_suggests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _toml(
        tmp_path,
        """# orch config
[tasks.report]
max_restart = 1

[tasks.crawl]
command = "x"
split = 2
max_restart = 3
""",
    )
    assert _load_error("orch.toml") == (
        "orch.toml:3: unknown key 'max_restart' in [tasks.report] (did you mean 'max_restarts'?)"
    )


def test_unknown_key_in_second_task_found_after_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, "[tasks.a]\nsplit = 1\n\n[tasks.crawl]\ncommand = 'x'\nmax_restart = 3\n")
    assert _load_error("orch.toml").startswith("orch.toml:6: unknown key 'max_restart'")


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[tasks.a]\nzzzz = 1\n")
    message = _load_error(path)
    assert message.endswith(":2: unknown key 'zzzz' in [tasks.a]")


def test_unknown_sub_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[tasks.a]\nsplit = 1\n\n[tasks.a.extra]\nx = 1\n")
    assert _load_error(path).endswith(":4: unknown key 'extra' in [tasks.a]")


def test_unknown_key_in_inline_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[tasks]\n\nb = { split = 1, job = 2 }\n")
    assert _load_error(path).endswith(":3: unknown key 'job' in [tasks.b] (did you mean 'jobs'?)")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, "\ntask = 1\n")
    assert _load_error(path).endswith(
        ":2: unknown top-level key 'task' (orch.toml holds [tasks.NAME] tables; "
        "did you mean 'tasks'?)"
    )
    path = _toml(tmp_path, "[tasks.a]\nsplit = 1\n[global]\nx = 1\n")
    assert ":3: unknown top-level key 'global'" in _load_error(path)


def test_tasks_must_be_tables(tmp_path: Path) -> None:
    assert "'tasks' must be a table" in _load_error(_toml(tmp_path, "tasks = 3\n"))
    message = _load_error(_toml(tmp_path, "[tasks]\ncrawl = 3\n"))
    assert message.endswith(":2: [tasks.crawl] must be a table, got an integer 3")


def test_task_name_rule(tmp_path: Path) -> None:
    message = _load_error(_toml(tmp_path, '[tasks."a b"]\nsplit = 1\n'))
    assert "task name 'a b'" in message


def test_malformed_toml_gives_file_line_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, "[tasks.a]\nsplit = 1\njobs = = 3\n")
    assert _load_error("orch.toml") == "orch.toml:3:8: Invalid value"
    _toml(tmp_path, "[tasks.a]\ncommand = [1,", "end.toml")
    assert _load_error("end.toml") == "end.toml: Invalid value (at end of file)"


def test_missing_directory_and_binary_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _load_error("nope.toml") == "nope.toml: no such file"
    (tmp_path / "d").mkdir()
    assert _load_error("d") == "d: is a directory, not a config file"
    (tmp_path / "bin.toml").write_bytes(b"[tasks.a]\nsplit = 1\n# \xff\n")
    assert _load_error("bin.toml") == "bin.toml:3: not valid UTF-8"


def test_config_outside_cwd_is_shown_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    path = _toml(tmp_path, "x = 1\n")
    assert _load_error(path).startswith(f"{path}:1: unknown top-level key 'x'")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80)
@given(st.text(max_size=60))
def test_load_config_never_crashes(tmp_path: Path, text: str) -> None:
    path = _toml(tmp_path, text, "fuzz.toml")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(key in KEYS for table in config.tasks.values() for key in table)


# ----------------------------------------------------------------------------- find_config


def test_find_config(tmp_path: Path) -> None:
    assert find_config(None, str(tmp_path)) is None
    _toml(tmp_path, "")
    assert find_config(None, str(tmp_path)) == str(tmp_path / "orch.toml")
    assert find_config("other.toml", str(tmp_path)) == str(tmp_path / "other.toml")
    assert find_config("/abs/x.toml", str(tmp_path)) == "/abs/x.toml"


# ----------------------------------------------------------------------------- build_task


def test_defaults() -> None:
    config = _build(_MIN)
    assert config == TaskConfig(name="crawl", command=("python", "x.py"), split=2)
    assert config.restart is Restart.ON_FAILURE
    assert config.jobs is None
    assert config.log_max_bytes == 10 * 1024 * 1024
    assert config.env == {}


def test_precedence_cli_over_file_over_defaults(tmp_path: Path) -> None:
    file_task = {
        "command": "python x.py",
        "split": 3,
        "jobs": 2,
        "max_restarts": 7,
        "stop_timeout": "30s",
    }
    config = _build(
        {"jobs": 4, "max_restarts": None, "backoff_max": "2m"}, file_task, _toml(tmp_path, "")
    )
    assert config.jobs == 4  # CLI
    assert config.max_restarts == 7  # file (the CLI's None is ignored)
    assert config.stop_timeout_s == 30.0  # file
    assert config.backoff_max_s == 120.0  # CLI
    assert config.backoff_initial_s == 1.0  # default


def test_all_keys_convert() -> None:
    config = _build(
        {
            "command": "python crawl.py --m '{id}'",
            "range": "1..10",
            "format": "csv",
            "restart": "always",
            "max_restarts": 0,
            "backoff_initial": "500ms",
            "backoff_max": 90,
            "backoff_factor": 1.5,
            "backoff_jitter": 0,
            "backoff_reset": "10m",
            "stop_timeout": 0,
            "heartbeat_interval": "2s",
            "heartbeat_timeout": "1m",
            "stall_timeout": "5m",
            "require_heartbeat": True,
            "max_memory": "200M",
            "log_max_size": "1MB",
            "log_backups": 0,
            "env": {"A": "1"},
            "jobs": 8,
        }
    )
    assert config.command == ("python", "crawl.py", "--m", "{id}")
    assert config.range == "1..10"
    assert config.restart is Restart.ALWAYS
    assert (config.backoff_initial_s, config.backoff_max_s) == (0.5, 90.0)
    assert (config.backoff_factor, config.backoff_jitter) == (1.5, 0.0)
    assert isinstance(config.backoff_max_s, float)
    assert (config.backoff_reset_s, config.stop_timeout_s) == (600.0, 0.0)
    assert (config.heartbeat_interval_s, config.heartbeat_timeout_s) == (2.0, 60.0)
    assert config.stall_timeout_s == 300.0
    assert config.require_heartbeat is True
    assert (config.max_memory_bytes, config.log_max_bytes, config.log_backups) == (
        200 * 1024**2,
        1_000_000,
        0,
    )
    assert dict(config.env) == {"A": "1"}


def test_zero_switches_off_max_memory_and_none_switches_off_timeouts() -> None:
    config = _build({**_MIN, "stall_timeout": "none", "max_memory": "0"})
    assert config.stall_timeout_s is None
    assert config.max_memory_bytes is None


def test_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "work").mkdir()
    (tmp_path / "here").mkdir()
    file_path = _toml(tmp_path / "conf", "")
    config = _build(
        {},
        {"command": "x", "shards": "m.csv", "cwd": "work"},
        file_path,
        cwd=str(tmp_path / "here"),
    )
    assert config.shards == str(tmp_path / "conf" / "m.csv")
    assert config.cwd == str(tmp_path / "conf" / "work")
    config = _build(
        {"shards": "../n.csv", "cwd": "."}, {"command": "x"}, file_path, cwd=str(tmp_path / "here")
    )
    assert config.shards == str(tmp_path / "n.csv")
    assert config.cwd == str(tmp_path / "here")


def test_cli_shard_source_replaces_the_files() -> None:
    config = _build({"split": 4}, {"command": "x", "shards": "/m.csv"})
    assert (config.split, config.shards) == (4, None)


def test_cli_command_replaces_file_call_and_shell() -> None:
    config = _build({"command": ["a", "b"]}, {"call": "m:f", "shell": True, "split": 1})
    assert (config.command, config.call, config.shell) == (("a", "b"), None, False)
    config = _build({"call": "pkg.mod:run"}, {"command": "x", "split": 1})
    assert (config.command, config.call) == ((), "pkg.mod:run")


def test_shell_keeps_string_whole() -> None:
    config = _build({"split": 1}, {"command": "echo {id} | tee out", "shell": True})
    assert config.command == ("echo {id} | tee out",)
    config = _build({"split": 1, "shell": True, "command": ["echo {id} && true"]})
    assert config.shell is True


def test_env_merges_cli_over_file() -> None:
    config = _build({**_MIN, "env": {"B": "cli", "C": "3"}}, {"env": {"A": "1", "B": "file"}})
    assert dict(config.env) == {"A": "1", "B": "cli", "C": "3"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"stop_timeout": "-1"},
            (
                "--stop-timeout: invalid duration '-1' (use seconds or e.g. "
                "'500ms', '30s', '5m', '1h')"
            ),
        ),
        ({"jobs": 0}, "--jobs: must be at least 1, got 0"),
        ({"jobs": "4"}, "--jobs: expected an integer >= 1, got a string '4'"),
        ({"max_restarts": -1}, "--max-restarts: must be at least 0, got -1"),
        ({"log_backups": -1}, "--log-backups: must be at least 0, got -1"),
        ({"backoff_factor": 0.5}, "--backoff-factor: must be a number >= 1, got 0.5"),
        ({"backoff_jitter": 1.5}, "--backoff-jitter: must be a number from 0 to 1, got 1.5"),
        ({"backoff_jitter": "x"}, "--backoff-jitter: expected a number from 0 to 1, got a string"),
        (
            {"backoff_initial": "2m"},
            ("--backoff-initial: backoff_initial (2m00s) is larger than backoff_max (1m00s)"),
        ),
        (
            {"heartbeat_timeout": 1},
            (
                "--heartbeat-timeout: heartbeat_timeout (1.0s) must be "
                "longer than heartbeat_interval (1.0s)"
            ),
        ),
        ({"heartbeat_interval": 0}, "--heartbeat-interval: must be more than 0, got 0"),
        (
            {"restart": "on_failure"},
            (
                "--restart: 'on_failure' is not one of on-failure, always, "
                "never; did you mean 'on-failure'?"
            ),
        ),
        ({"restart": 1}, "--restart: expected one of on-failure, always, never, got an integer"),
        (
            {"format": "jsnol"},
            ("--format: 'jsnol' is not one of csv, tsv, jsonl, text; did you mean 'jsonl'?"),
        ),
        ({"cwd": "/nonexistent/x"}, "--cwd: no such directory '/nonexistent/x'"),
        ({"require_heartbeat": "yes"}, "--require-heartbeat: expected true or false, got a string"),
        ({"max_memory": "lots"}, "--max-memory: invalid size 'lots'"),
        ({"log_max_size": 0}, "--log-max-size: must be more than 0, got 0"),
        ({"split": 0}, "--split: must be at least 1, got 0"),
        ({"split": None, "range": "9..1"}, "--range: end 1 is before start 9 in '9..1'"),
        ({"split": None, "range": "x"}, "--range: invalid range 'x' (use A..B, e.g. 1..10)"),
        ({"split": None, "shards": ""}, "--shards: expected a non-empty string, got a string ''"),
        ({"command": None, "call": "not a callable"}, "--call: expected 'package.module:function'"),
        ({"command": []}, "the command after --: empty command"),
        ({"command": "a 'b"}, "the command after --: cannot split the command (No closing "),
        ({"command": ["a", 1]}, "the command after --[1]: expected a string, got an integer 1"),
        ({"command": 5}, "the command after --: expected an array of strings or a string"),
        (
            {"shell": True},
            (
                "the command after --: with shell = true the command must be one "
                "string, got 2 elements"
            ),
        ),
        ({"env": {"A": 1}}, '--env.A: expected a string, got an integer 1 (quote it: A = "...")'),
        ({"env": {"A=B": "1"}}, "--env: invalid environment variable name 'A=B'"),
        ({"env": ["A"]}, "--env: expected a table of strings, got an array"),
    ],
)
def test_override_errors_name_the_flag(overrides: dict[str, Any], message: str) -> None:
    assert _build_error({**_MIN, **overrides}).startswith(message)


def test_file_errors_name_file_task_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _toml(tmp_path, "")
    message = _build_error({}, {"command": "x", "split": 1, "stop_timeout": "soon"}, path)
    assert message.startswith("orch.toml: [tasks.crawl] stop_timeout: invalid duration 'soon'")
    message = _build_error({}, {"command": "x", "split": 1, "jobs": 1.5}, path)
    assert message == "orch.toml: [tasks.crawl] jobs: expected an integer >= 1, got a number 1.5"
    message = _build_error({}, {"command": "x", "split": 1, "max_restart": 1}, path)
    assert (
        message == "orch.toml: unknown key 'max_restart' in [tasks.crawl] "
        "(did you mean 'max_restarts'?)"
    )


def test_no_command_and_no_shard_list() -> None:
    assert _build_error({"split": 1}) == (
        "no command: give one after -- or set command/call in orch.toml"
    )
    assert _build_error({"command": ["x"]}) == (
        "no shard list: give --shards FILE, --split N or --range A..B"
    )


def test_conflicts_within_one_layer() -> None:
    assert _build_error({}, {"command": "x", "call": "a:b", "split": 1}) == (
        "orch.toml: [tasks.crawl] call: give either command or call, not both"
    )
    assert _build_error({"command": ["x"], "split": 1, "range": "1..2"}) == (
        "--range: give only one of shards, split, range (got split and range)"
    )
    assert _build_error({"call": "a:b", "shell": True, "split": 1}).startswith(
        "--shell: shell = true needs a command"
    )


def test_override_of_unknown_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown override 'job'"):
        _build({**_MIN, "job": 3})


def test_bad_task_name() -> None:
    with pytest.raises(ConfigError, match="task name 'a/b'"):
        _build(_MIN, name="a/b")


_override_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), _override_value, max_size=6))
def test_build_task_never_crashes(overrides: dict[str, Any]) -> None:
    try:
        config = _build({**_MIN, **overrides}, cwd="/")
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert config.backoff_initial_s <= config.backoff_max_s
        assert 0 < config.heartbeat_interval_s < config.heartbeat_timeout_s
        assert bool(config.command) != bool(config.call)
        assert [config.shards, config.split, config.range].count(None) == 2


# ----------------------------------------------------------------------------- TaskConfig


_text = st.text(max_size=10)
_task_configs = st.builds(
    TaskConfig,
    name=_text,
    command=st.lists(_text, max_size=4).map(tuple),
    call=st.none() | _text,
    shell=st.booleans(),
    shards=st.none() | _text,
    format=st.none() | st.sampled_from(["csv", "jsonl"]),
    split=st.none() | st.integers(1, 10**6),
    range=st.none() | st.just("1..10"),
    env=st.dictionaries(_text, _text, max_size=3),
    cwd=st.none() | _text,
    jobs=st.none() | st.integers(1, 1000),
    restart=st.sampled_from(list(Restart)),
    max_restarts=st.integers(0, 100),
    backoff_initial_s=st.floats(0, 1e6),
    backoff_max_s=st.floats(0, 1e6),
    backoff_factor=st.floats(1, 10),
    backoff_jitter=st.floats(0, 1),
    backoff_reset_s=st.floats(0, 1e6),
    stop_timeout_s=st.floats(0, 1e6),
    heartbeat_interval_s=st.floats(0.001, 1e3),
    heartbeat_timeout_s=st.none() | st.floats(0.001, 1e3),
    heartbeat_timeout_set=st.booleans(),
    stall_timeout_s=st.none() | st.floats(0.001, 1e6),
    require_heartbeat=st.booleans(),
    max_memory_bytes=st.none() | st.integers(1, 2**62),
    log_max_bytes=st.integers(1, 2**62),
    log_backups=st.integers(0, 100),
)


@given(_task_configs)
def test_task_config_json_round_trip(config: TaskConfig) -> None:
    data = orjson.loads(orjson.dumps(config.to_json()))
    back = TaskConfig.from_json(data)
    assert back == config
    assert hash(back) == hash(config)
    assert isinstance(back.restart, Restart)


def test_task_config_is_immutable_and_hashable() -> None:
    config = TaskConfig(command=["a"], env={"A": "1"})  # type: ignore[arg-type]
    assert config.command == ("a",)
    assert {config: 1}[TaskConfig(command=("a",), env={"A": "1"})] == 1
    with pytest.raises(AttributeError):
        config.jobs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.env["B"] = "2"  # type: ignore[index]


def test_from_json_coerces_ints_and_rejects_unknown_keys() -> None:
    assert TaskConfig.from_json({"backoff_max_s": 5}).backoff_max_s == 5.0
    assert isinstance(TaskConfig.from_json({"backoff_max_s": 5}).backoff_max_s, float)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        TaskConfig.from_json({"bogus": 1})
    with pytest.raises(ConfigError, match="task snapshot"):
        TaskConfig.from_json({"restart": "sometimes"})


# ----------------------------------------------------------------------------- ray backend keys


def test_ray_keys_from_file_and_flags() -> None:
    task = _build(
        {"shard_cpus": 0.5, "ray_address": "10.0.0.5:6379"},
        {**_MIN, "backend": "ray", "resources": {"nodeA": 1}, "shard_memory": "2GiB"},
        "/x/orch.toml",
    )
    assert task.backend == "ray" and task.ray_address == "10.0.0.5:6379"
    assert task.resources == (("nodeA", 1.0),) and task.shard_cpus == 0.5
    assert task.shard_memory_bytes == 2 << 30
    assert TaskConfig.from_json(orjson.loads(orjson.dumps(task.to_json()))) == task


def test_ray_defaults() -> None:
    task = _build(None, _MIN, "/x/orch.toml")
    assert (task.backend, task.ray_address, task.resources) == ("local", None, ())
    assert (task.shard_cpus, task.shard_memory_bytes) == (1.0, None)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("backend", "k8s", "'k8s' is not one of local, ray"),
        ("resources", ["nodeA"], "expected a table of resource names to numbers"),
        ("resources", {"nodeA": "one"}, "resources.nodeA: expected a number >= 0"),
        ("resources", {"nodeA": -1}, "resources.nodeA: expected a number >= 0"),
        ("shard_cpus", -1, "must be a number >= 0"),
        ("shard_memory", "lots", "shard_memory"),
        ("ray_address", "", "expected HOST:PORT or 'auto'"),
    ],
)
def test_bad_ray_keys_name_file_task_and_key(key: str, value: Any, expected: str) -> None:
    error = _build_error(None, {**_MIN, key: value}, "/x/orch.toml")
    assert "[tasks.crawl]" in error and key in error and expected in error, error
# ----------------------------------------------------------------------------- operating keys


def test_operating_keys_defaults_and_conversion() -> None:
    plain = _build(_MIN)
    assert (plain.final_exit_codes, plain.max_failed, plain.concurrency, plain.autostart) == (
        (),
        None,
        1,
        False,
    )
    task = _build(
        {"final_exit_codes": "4, 44,4", "max_failed": 0},
        {**_MIN, "concurrency": 3, "autostart": True, "final_exit_codes": [9]},
    )
    assert task.final_exit_codes == (4, 44)  # the flag wins; repeats dropped
    assert (task.max_failed, task.concurrency, task.autostart) == (0, 3, True)
    assert _build({}, {**_MIN, "final_exit_codes": [4, 44]}).final_exit_codes == (4, 44)
    assert TaskConfig.from_json(orjson.loads(orjson.dumps(task.to_json()))) == task


@pytest.mark.parametrize(
    ("overrides", "file_task", "message"),
    [
        ({"final_exit_codes": "4,x"}, {}, "--final-exit-codes: expected exit codes from 1 to 255"),
        ({"final_exit_codes": "0"}, {}, "--final-exit-codes: expected exit codes from 1 to 255"),
        ({}, {"final_exit_codes": [256]}, "[tasks.crawl] final_exit_codes: expected exit codes"),
        ({}, {"final_exit_codes": 4}, "[tasks.crawl] final_exit_codes: expected exit codes"),
        ({}, {"final_exit_codes": [True]}, "[tasks.crawl] final_exit_codes: expected exit codes"),
        ({"max_failed": -1}, {}, "--max-failed: must be at least 0, got -1"),
        ({}, {"concurrency": 0}, "[tasks.crawl] concurrency: must be at least 1, got 0"),
        ({}, {"autostart": "yes"}, "[tasks.crawl] autostart: expected true or false"),
    ],
)
def test_operating_keys_errors_name_the_key(
    overrides: dict[str, Any], file_task: dict[str, Any], message: str
) -> None:
    error = _build_error({**overrides}, {**_MIN, **file_task}, "orch.toml")
    assert message in error
