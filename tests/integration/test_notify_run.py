"""Notifications of real runs: ``orch run`` (foreground and -d) of a task with ``notify``,
a real HTTP receiver on 127.0.0.1, delivered once across a master SIGKILL and resume,
secrets never shown."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.world import Env, poll_for, run_pids
from notify_receiver import Receiver

TOKEN = "tok-5ecret-abc"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _deliverers(home: Path) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.notify.deliver" in argv and any(str(home).encode() in a for a in argv):
            out.append(int(pid))
    return out


@pytest.fixture
def world(env: Env) -> Iterator[Env]:
    yield env
    for pid in _deliverers(env.home):  # a deliverer left retrying: ours, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _config(env: Env, receiver: Receiver, events: str = '"done", "failed", "gave_up"') -> None:
    env.write(
        "orch.toml",
        f"""
[notify.hook]
kind = "webhook"
url = "{receiver.url("/hook", "token=" + TOKEN)}"
events = [{events}]

[tasks.ok]
command = ["true"]
split = 2
notify = ["hook"]

[tasks.bad]
command = ["sh", "-c", "exit 3"]
split = 2
restart = "never"
notify = ["hook"]

[tasks.slow]
command = ["sh", "-c", "if [ {{index}} = 0 ]; then exit 3; fi; [ -e flag ] || sleep 1000"]
split = 2
restart = "never"
stop_timeout = "1s"
notify = ["hook"]
""",
    )


def _events(receiver: Receiver) -> list[str]:
    return [r.body["event"] for r in receiver.got("/hook")]


def _idle(env: Env) -> bool:
    return not _deliverers(env.home)


def test_foreground_run_notifies_done_after_it_returned(world: Env, receiver: Receiver) -> None:
    _config(world, receiver)
    receiver.script("/hook", [(503, "busy"), (503, "busy")])  # retried after orch run returns
    proc = world.orch("run", "ok")
    assert proc.returncode == 0, proc.stderr
    # Nothing accepted yet: the deliverer starts as the run ends, so its first try may come
    # just before or just after orch run returns, but the one it accepts (the third, after
    # backoffs of 1 s and 2 s) comes after: at most the two refusals are in.
    assert _events(receiver) in ([], ["done"], ["done"] * 2)
    assert poll_for(lambda: _events(receiver) == ["done"] * 3, timeout=20)
    body = receiver.got("/hook")[-1].body
    run_id = world.run_id()
    assert (body["run"], body["name"], body["state"]) == (run_id, "ok", "done")
    assert body["counts"] == {"done": 2} and body["notification_id"].startswith(run_id)
    assert poll_for(lambda: _idle(world), timeout=15)
    assert _events(receiver) == ["done"] * 3  # two refused, one accepted, nothing more


def test_failed_run_notifies_each_gave_up_then_failed(world: Env, receiver: Receiver) -> None:
    _config(world, receiver)
    proc = world.orch("run", "bad")
    assert proc.returncode == 1
    assert poll_for(lambda: len(_events(receiver)) == 3, timeout=15)
    assert sorted(_events(receiver)) == ["failed", "gave_up", "gave_up"]
    failed = next(r.body for r in receiver.got("/hook") if r.body["event"] == "failed")
    assert failed["failed_count"] == 2 and {f["id"] for f in failed["failed"]} == {"0", "1"}
    assert all(f["reason"] == "exit 3" for f in failed["failed"])
    gave_up = [r.body for r in receiver.got("/hook") if r.body["event"] == "gave_up"]
    assert {g["shard"]["id"] for g in gave_up} == {"0", "1"}


def test_detached_run_notifies_and_secrets_are_never_shown(world: Env, receiver: Receiver) -> None:
    _config(world, receiver)
    proc = world.orch("run", "-d", "bad")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split()[-1]
    assert poll_for(lambda: "failed" in _events(receiver), timeout=20)
    assert poll_for(lambda: _idle(world), timeout=15)
    assert sorted(_events(receiver)) == ["failed", "gave_up", "gave_up"]
    shown = [
        world.orch("status", run_id).stdout,
        world.orch("status", run_id, "--json").stdout,
        world.orch("status", "--json").stdout,
        world.orch("logs", run_id).stdout,
    ]
    run_dir = world.home / "runs" / run_id
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != "notify.json":
            shown.append(path.read_bytes().decode(errors="replace"))
    with sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert "outbox" in tables
        for table in tables:
            shown += [str(row) for row in db.execute(f"SELECT * FROM {table}")]
    assert all(TOKEN not in text for text in shown)
    assert any("hook" in text for text in shown)  # the channel is named, its URL never
    assert oct((run_dir / "notify.json").stat().st_mode & 0o777) == "0o600"
    assert TOKEN in (run_dir / "notify.json").read_text()  # only there, for the deliverer


def test_delivered_once_across_a_master_sigkill_and_resume(world: Env, receiver: Receiver) -> None:
    _config(world, receiver)
    proc = world.orch("run", "-d", "slow")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split()[-1]
    assert poll_for(lambda: "gave_up" in _events(receiver), timeout=20)
    master = world.status(run_id)["master_pid"]
    assert master
    os.kill(master, signal.SIGKILL)
    assert poll_for(lambda: world.status(run_id)["state"] == "lost", timeout=15)
    assert poll_for(lambda: not run_pids(run_id, world.home), timeout=15)  # the guardian's work
    (world.cwd / "flag").write_text("")
    resumed = world.orch("resume", run_id)
    assert resumed.returncode == 1, resumed.stderr  # shard 0 failed: the run ends failed
    assert poll_for(lambda: "failed" in _events(receiver), timeout=20)
    assert poll_for(lambda: _idle(world), timeout=15)
    assert sorted(_events(receiver)) == ["failed", "gave_up"]  # each once
    ids = [r.body["notification_id"] for r in receiver.got("/hook")]
    assert len(set(ids)) == 2


def test_digest_while_the_run_is_live(world: Env, receiver: Receiver) -> None:
    world.write(
        "orch.toml",
        f"""
[notify.hook]
kind = "webhook"
url = "{receiver.url("/hook")}"
events = ["done"]
digest_every = "1s"

[tasks.live]
command = ["sh", "-c", "[ -e flag ] || sleep 1000"]
split = 1
notify = ["hook"]
""",
    )
    proc = world.orch("run", "-d", "live")
    assert proc.returncode == 0, proc.stderr
    assert poll_for(lambda: _events(receiver).count("digest") >= 2, timeout=20)
    digest = next(r.body for r in receiver.got("/hook") if r.body["event"] == "digest")
    assert digest["state"] == "running" and digest["counts"] == {"running": 1}
    (world.cwd / "flag").write_text("")
    world.orch("stop", proc.stdout.split()[-1])
    assert poll_for(lambda: _idle(world), timeout=20)
    assert "done" not in _events(receiver)  # stopped, and this channel takes only done


def test_unset_secret_env_is_exit_2_before_a_run_exists(world: Env, receiver: Receiver) -> None:
    world.write(
        "orch.toml",
        f"""
[notify.ding]
kind = "dingtalk"
url = "{receiver.url("/robot")}"
secret_env = "ORCH_TEST_NO_SUCH_SECRET"

[tasks.t]
command = ["true"]
split = 1
notify = ["ding"]
""",
    )
    proc = world.orch("run", "t")
    assert proc.returncode == 2
    assert "ORCH_TEST_NO_SUCH_SECRET" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (world.home / "runs").exists() or not any((world.home / "runs").iterdir())
    assert json.loads(world.orch("status", "--json").stdout) == []
