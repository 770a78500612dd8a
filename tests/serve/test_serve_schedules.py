"""Schedules, services and the systemd unit of a real ``orch serve`` with real runs.

One serve (module-scoped) with an orch.toml of ``every = "2s"``-style
schedules and an autostart service; the restart test stops that serve
(without touching its runs) and starts another on the same home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servetest import PYTHON, TOKEN, Served, orch_env, poll_for

V1 = "/api/v1"

SLEEPER = """import time
for _ in range(6000):
    time.sleep(0.1)  # allowed-sleep: a job that runs until it is stopped
"""


def config(work: Path) -> str:
    sleeper = work / "sleeper.py"
    sleeper.write_text(SLEEPER)
    quick = json.dumps([PYTHON, "-c", "print('tick')"])
    long = json.dumps([PYTHON, str(sleeper)])
    return f"""
[tasks.tick]
command = {quick}
split = 1
every = "2s"

[tasks.long]
command = {long}
split = 1
every = "2s"
stop_timeout = "2s"

[tasks.swap]
command = {long}
split = 1
every = "3s"
overlap = "replace"
stop_timeout = "2s"

[tasks.svc]
command = {long}
split = 1
autostart = true
stop_timeout = "2s"
"""


class Reader:
    """The ndjson event stream, read in a thread."""

    def __init__(self, served: Served) -> None:
        self.events: list[dict[str, Any]] = []
        self._client = httpx.Client(
            base_url=served.base,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=httpx.Timeout(60, read=60),
        )
        self._stop = False
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        assert self.ready.wait(30)

    def _read(self) -> None:
        try:
            with self._client.stream("GET", f"{V1}/events?format=ndjson") as r:
                self.ready.set()
                for line in r.iter_lines():
                    if line.strip():
                        self.events.append(json.loads(line))
                    if self._stop:
                        return
        except (httpx.HTTPError, OSError):
            if not self._stop:
                raise

    def close(self) -> None:
        self._stop = True
        self._client.close()


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = Path(tmp_path_factory.mktemp("sched"))
    work = root / "work"
    work.mkdir()
    server = Served(root, config=config(work))
    try:
        yield server
    finally:
        server.stop()


def _runs(served: Served, name: str) -> list[dict[str, Any]]:
    r = served.get(f"{V1}/runs")
    assert r.status_code == 200, r.text
    return [run for run in r.json() if run.get("name") == name]


def _live(served: Served, name: str) -> list[dict[str, Any]]:
    return [r for r in _runs(served, name) if r["state"] in ("running", "pending")]


def _metric(served: Served, job: str, outcome: str) -> float:
    text = served.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "orch_schedule_runs_total"
                and s.labels.get("job") == job
                and s.labels.get("outcome") == outcome
            ):
                return float(s.value)
    return 0.0


def test_every_fires_repeatedly_with_events_and_metric(sched: Served) -> None:
    reader = Reader(sched)
    try:
        fired = poll_for(
            lambda: [
                e
                for e in reader.events
                if e.get("schedule") == "tick" and e.get("outcome") == "fired"
            ][1:],
            timeout=30,
        )
        assert fired, reader.events[-10:]
        assert all(e["type"] == "schedule" and e["run"] for e in fired)
    finally:
        reader.close()
    done = poll_for(
        lambda: len([r for r in _runs(sched, "tick") if r["state"] == "done"]) >= 2, timeout=30
    )
    assert done, _runs(sched, "tick")
    assert poll_for(lambda: _metric(sched, "tick", "fired") >= 2, timeout=10)


def test_overlap_skip_keeps_one_live_run_and_records_a_skip(sched: Served) -> None:
    assert poll_for(lambda: _metric(sched, "long", "skipped") >= 1, timeout=30), sched.output()
    assert len(_live(sched, "long")) == 1
    assert len(_runs(sched, "long")) == 1
    assert "schedule long: skipped" in sched.output()


def test_overlap_replace_stops_the_live_run_and_starts_another(sched: Served) -> None:
    assert poll_for(lambda: _metric(sched, "swap", "replaced") >= 1, timeout=40), sched.output()
    runs = poll_for(
        lambda: (
            (rs := _runs(sched, "swap")) and len(rs) >= 2 and rs[-1]["state"] == "stopped" and rs
        ),
        timeout=30,
    )
    assert runs, _runs(sched, "swap")
    assert len(_live(sched, "swap")) == 1


def test_schedules_endpoint_and_command(sched: Served) -> None:
    assert poll_for(lambda: _metric(sched, "tick", "fired") >= 1, timeout=30)
    r = sched.get(f"{V1}/schedules")
    assert r.status_code == 200, r.text
    rows = {row["task"]: row for row in r.json()}
    assert set(rows) == {"tick", "long", "swap"}
    tick = rows["tick"]
    assert tick["schedule"] == "every 2s" and tick["overlap"] == "skip"
    assert tick["last_fire"] is not None and tick["next_fire"] == pytest.approx(
        tick["last_fire"] + 2
    )
    assert rows["swap"]["overlap"] == "replace"
    out = sched.orch("schedules", "--config", str(sched.config), "--home", str(sched.home))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["TASK", "SCHEDULE"]
    assert any(ln.startswith("tick") and "every 2s" in ln for ln in lines[1:])
    as_json = sched.orch("schedules", "--config", str(sched.config), "--json")
    assert {row["task"] for row in json.loads(as_json.stdout)} == {"tick", "long", "swap"}
    state = sched.home / "serve" / "schedules.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    missing = sched.orch("schedules", "--config", str(sched.root / "nope.toml"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_autostart_service_runs_and_is_not_duplicated_by_a_serve_restart(sched: Served) -> None:
    live = poll_for(lambda: _live(sched, "svc"), timeout=30)
    assert len(live) == 1, _runs(sched, "svc")
    detail = sched.run(live[0]["id"])
    assert detail["task"]["restart"] == "always"
    # stop serve alone (its runs live on), then start another on the same home
    sched.proc.send_signal(signal.SIGINT)
    sched.proc.wait(timeout=15)
    sched.client.close()
    sched.out.close()
    again = Served(sched.root, config=sched.config.read_text())
    sched.__dict__.update(again.__dict__)  # the module's other tests and teardown use it
    assert poll_for(lambda: "service svc: running" in sched.output(), timeout=30), sched.output()
    assert [r["id"] for r in _live(sched, "svc")] == [live[0]["id"]]
    assert len(_runs(sched, "svc")) == 1


def test_print_systemd_unit(tmp_path: Path) -> None:
    (tmp_path / "orch.toml").write_text("[tasks.a]\ncommand = ['true']\nsplit = 1\n")
    home = tmp_path / "home"
    proc = subprocess.run(
        [PYTHON, "-m", "orchestrator", "serve", "--port", "9011", "--print-systemd-unit"],
        cwd=tmp_path,
        env=orch_env(home, {"ORCH_TOKEN": "do-not-print-me"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    unit = proc.stdout
    lines = unit.splitlines()
    [start] = [ln for ln in lines if ln.startswith("ExecStart=")]
    exe = start.removeprefix("ExecStart=").split()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK), start
    assert "serve --host 127.0.0.1 --port 9011" in start
    assert f"--config {tmp_path / 'orch.toml'}" in start and f"--home {home}" in start
    assert "Restart=on-failure" in lines
    assert f"Environment=ORCH_HOME={home}" in lines
    assert "[Install]" in lines and "WantedBy=default.target" in lines
    assert "do-not-print-me" not in unit
