"""orch.toml with notify channels, schedules and [gc], read by a real ``orch run``."""

from __future__ import annotations

from helpers.world import Env


def test_run_of_a_task_with_notify_and_schedule_keys(env: Env) -> None:
    env.write(
        "orch.toml",
        '[notify.ops]\nkind = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
        "[gc]\nkeep_runs = 5\n"
        '[tasks.hello]\ncommand = ["true"]\nsplit = 2\nnotify = ["ops"]\n'
        'every = "30s"\noverlap = "queue"\n',
    )
    done = env.orch("run", "hello")
    assert done.returncode == 0, done.stderr
    assert env.status()[0]["counts"] == {"done": 2}


TASK = '[tasks.t]\ncommand = ["true"]\nsplit = 1\n'


def test_bad_ops_config_is_exit_2_before_anything_starts(env: Env) -> None:
    cases = {
        '[tasks.t]\ncommand = ["true"]\nsplit = 1\nnotify = ["ops"]\n': (
            "orch: orch.toml: [tasks.t] notify: unknown channel 'ops' (known: none defined)"
        ),
        '[notify.ops]\nkind = "pager"\nurl = "http://x"\n' + TASK: (
            "orch: orch.toml: [notify.ops] kind: unknown kind 'pager'"
        ),
        '[notify.ops]\nkind = "slack"\n[tasks.t]\ncommand = ["true"]\nsplit = 1\n': (
            "orch: orch.toml: [notify.ops]: missing url"
        ),
        '[tasks.t]\ncommand = ["true"]\nsplit = 1\nschedule = "*/5 * * *"\n': (
            "orch: orch.toml: [tasks.t] schedule: invalid cron expression '*/5 * * *'"
        ),
        '[tasks.t]\ncommand = ["true"]\nsplit = 1\nevery = "5 mins"\n': (
            "orch: orch.toml: [tasks.t] every (schedule): invalid duration '5 mins'"
        ),
    }
    for text, expected in cases.items():
        env.write("orch.toml", text)
        done = env.orch("run", "t")
        assert done.returncode == 2, (text, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith(expected), (line, expected)
    assert not (env.home / "runs").exists()  # nothing was started
