"""Promise 8: bad input gets one clear line, exit code 2, and nothing started.

For every mistake in issue 2's list, ``orch run`` must print exactly one line
on stderr, starting ``orch: `` and naming what is wrong and where (file,
line, field, flag), exit with 2, print no traceback, start no child (the
command would create ``child-ran``) and create no run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.world import Env

#: A command that leaves a trace if it ever runs.
TOUCH = ["--", "touch", "child-ran"]
TOML_OK = '[tasks.crawl]\ncommand = ["touch", "child-ran"]\nsplit = 2\n\n' \
          '[tasks.report]\ncommand = "touch child-ran"\nsplit = 1\n'

# (id, files to write, orch arguments, substrings the error line must contain)
CASES: list[tuple[str, dict[str, str | bytes], list[str], list[str]]] = [
    ("missing-shard-file", {}, ["--shards", "nope.csv", *TOUCH], ["nope.csv", "no such file"]),
    ("shard-file-is-a-directory", {"d.csv/x": ""}, ["--shards", "d.csv", *TOUCH],
     ["d.csv", "directory"]),
    ("csv-without-header", {"s.csv": ""}, ["--shards", "s.csv", *TOUCH], ["s.csv", "no header"]),
    ("csv-row-wrong-width", {"s.csv": "id,name\na,1\nb,2\nc,3,4\n"},
     ["--shards", "s.csv", *TOUCH], ["s.csv:4", "3 fields", "header has 2"]),
    ("csv-row-too-short", {"s.csv": "id,name\na,1\nb\n"}, ["--shards", "s.csv", *TOUCH],
     ["s.csv:3", "1 field"]),
    ("not-utf8", {"s.csv": b"id,name\na,ok\nb,caf\xe9\n"}, ["--shards", "s.csv", *TOUCH],
     ["s.csv:3", "UTF-8"]),
    ("not-utf8-text", {"s.txt": b"one\n\xff\xfe\n"}, ["--shards", "s.txt", *TOUCH],
     ["s.txt:2", "UTF-8"]),
    ("duplicate-ids-csv", {"s.csv": "id,x\na,1\nb,2\na,3\n"}, ["--shards", "s.csv", *TOUCH],
     ["s.csv", "'a'", "4", "line 2"]),
    ("duplicate-ids-jsonl", {"s.jsonl": '{"id": "a"}\n{"id": "b"}\n{"id": "b"}\n'},
     ["--shards", "s.jsonl", *TOUCH], ["s.jsonl", "'b'", "3", "line 2"]),
    ("empty-shard-list-csv", {"s.csv": "id,name\n"}, ["--shards", "s.csv", *TOUCH],
     ["s.csv", "no shards"]),
    ("empty-shard-list-text", {"s.txt": "\n  \n\n"}, ["--shards", "s.txt", *TOUCH],
     ["s.txt", "no shards"]),
    ("empty-shard-list-jsonl", {"s.jsonl": ""}, ["--shards", "s.jsonl", *TOUCH],
     ["s.jsonl", "no shards"]),
    ("invalid-jsonl", {"s.jsonl": '{"id": "a"}\n{"id": "b",}\n'}, ["--shards", "s.jsonl", *TOUCH],
     ["s.jsonl:2", "JSON"]),
    ("template-field-csv", {"s.csv": "id,merchant\na,1\n"},
     ["--shards", "s.csv", "--", "touch", "child-ran", "{merchnat}"],
     ["s.csv", "'merchnat'", "merchant"]),
    ("template-field-jsonl", {"s.jsonl": '{"id": "a", "x": 1}\n{"id": "b"}\n'},
     ["--shards", "s.jsonl", "--", "touch", "child-ran", "{x}"], ["s.jsonl:2", "'x'"]),
    ("template-field-in-env", {"s.csv": "id\na\n"},
     ["--shards", "s.csv", "--env", "K={nope}", *TOUCH], ["'nope'"]),
    ("template-abbreviated-field", {}, ["--split", "2", "--", "touch", "child-ran", "{idx}"],
     ["'idx'", "did you mean 'index'"]),
    ("unknown-task", {"orch.toml": TOML_OK}, ["crawlr"],
     ["unknown task 'crawlr'", "crawl", "report", "did you mean 'crawl'"]),
    ("unknown-task-no-file", {}, ["crawl"], ["unknown task 'crawl'", "orch.toml"]),
    ("malformed-toml", {"orch.toml": '[tasks.crawl]\ncommand = ["touch", "child-ran"\nsplit = 2\n'},
     ["crawl"], ["orch.toml:3:1"]),
    ("malformed-toml-value", {"orch.toml": "[tasks.crawl]\nsplit = = 2\n"}, ["crawl"],
     ["orch.toml:2:"]),
    ("unknown-key-toml", {"orch.toml": '[tasks.crawl]\ncomand = ["true"]\nsplit = 2\n'},
     ["crawl"], ["orch.toml:2", "'comand'", "did you mean 'command'"]),
    ("bad-duration-toml",
     {"orch.toml": TOML_OK.replace("split = 2", 'split = 2\nstop_timeout = "-5s"')},
     ["crawl"], ["orch.toml", "stop_timeout", "-5s"]),
    ("missing-config", {}, ["--config", "nope.toml", "crawl"], ["nope.toml", "no such file"]),
    ("negative-duration", {}, ["--split", "2", "--stop-timeout", "-1", *TOUCH],
     ["--stop-timeout", "'-1'"]),
    ("unparseable-duration", {}, ["--split", "2", "--stop-timeout", "soon", *TOUCH],
     ["--stop-timeout", "'soon'"]),
    ("unparseable-backoff", {}, ["--split", "2", "--backoff-initial", "1x", *TOUCH],
     ["--backoff-initial", "'1x'"]),
    ("split-0", {}, ["--split", "0", *TOUCH], ["--split", "0"]),
    ("split-negative", {}, ["--split", "-3", *TOUCH], ["--split", "-3"]),
    ("jobs-0", {}, ["--split", "2", "--jobs", "0", *TOUCH], ["--jobs", "0"]),
    ("jobs-not-a-number", {}, ["--split", "2", "--jobs", "many", *TOUCH], ["--jobs", "many"]),
    ("bad-range", {}, ["--range", "5..3", *TOUCH], ["--range", "5..3"]),
    ("bad-restart", {}, ["--split", "2", "--restart", "sometimes", *TOUCH],
     ["--restart", "sometimes"]),
    ("bad-env", {}, ["--split", "2", "--env", "NOEQUALS", *TOUCH], ["--env", "NOEQUALS"]),
    ("bad-cwd", {}, ["--split", "2", "--cwd", "nodir", *TOUCH], ["--cwd", "nodir"]),
    ("backoff-initial-over-max", {},
     ["--split", "2", "--backoff-initial", "5s", "--backoff-max", "1s", *TOUCH],
     ["--backoff-", "backoff_max"]),
    ("two-shard-lists", {"s.csv": "id\na\n"}, ["--shards", "s.csv", "--split", "2", *TOUCH],
     ["only one"]),
    ("executable-not-found", {}, ["--split", "2", "--", "no-such-prog-xyz", "a"],
     ["executable not found", "'no-such-prog-xyz'"]),
    ("executable-not-found-path", {}, ["--split", "2", "--", "./no-such-prog-xyz"],
     ["executable not found", "no-such-prog-xyz"]),
    ("not-executable", {"script.sh": "echo hi\n"}, ["--split", "2", "--", "./script.sh"],
     ["permission denied", "script.sh"]),
    ("no-command", {}, ["--split", "2"], ["no command"]),
    ("no-shard-list", {}, ["--", "touch", "child-ran"], ["no shard list", "--shards"]),
    ("unknown-flag", {}, ["--split", "2", "--bogus", *TOUCH], ["--bogus"]),
    ("extra-arguments", {}, ["--split", "2", "touch", "child-ran"], ["'--'"]),
]


def assert_rejected(env: Env, proc: object, expected: list[str]) -> str:
    stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode  # type: ignore[attr-defined]
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    line = lines[0]
    assert line.startswith("orch: "), line
    for part in expected:
        assert part in line, (part, line)
    runs = env.home / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    assert not (env.cwd / "child-ran").exists()
    return line


@pytest.mark.parametrize(("files", "args", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_started(
    env: Env, files: dict[str, str | bytes], args: list[str], expected: list[str]
) -> None:
    for name, content in files.items():
        path = env.cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    assert_rejected(env, env.orch("run", *args), expected)


def test_unreadable_shard_file(env: Env) -> None:
    path: Path = env.write("s.csv", "id\na\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: a mode-000 file is still readable")
        assert_rejected(env, env.orch("run", "--shards", "s.csv", *TOUCH),
                        ["s.csv", "permission denied"])
    finally:
        path.chmod(0o600)


def test_dangling_symlink_shard_file(env: Env) -> None:
    """A shard file that cannot be reached even by root: a link to nowhere."""
    (env.cwd / "s.csv").symlink_to(env.cwd / "gone" / "s.csv")
    assert_rejected(env, env.orch("run", "--shards", "s.csv", *TOUCH), ["s.csv"])


def test_bad_input_leaves_earlier_runs_alone(env: Env) -> None:
    ok = env.orch("run", "--split", "1", "--", "true")
    assert ok.returncode == 0, ok.stderr
    before = sorted(p.name for p in (env.home / "runs").iterdir())
    bad = env.orch("run", "--split", "0", "--", "true")
    assert bad.returncode == 2 and bad.stderr.startswith("orch: ")
    assert sorted(p.name for p in (env.home / "runs").iterdir()) == before


@pytest.mark.parametrize("args", [["status", "nope"], ["logs", "nope"]], ids=["status", "logs"])
def test_unknown_run_is_one_line(env: Env, args: list[str]) -> None:
    proc = env.orch(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("orch: ") and proc.stderr.count("\n") == 1
    assert "'nope'" in proc.stderr and "Traceback" not in proc.stderr
