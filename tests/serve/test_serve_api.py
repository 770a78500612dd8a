"""``orch serve`` from outside: real server, real runs, real HTTP (docs/web.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servetest import PYTHON, SECRET, TOKEN, Served, orch_env, poll_for

V1 = "/api/v1"


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return str(body["error"])


def _status_json(served: Served, run: str | None = None) -> Any:
    args = ["status", "--json", "--home", str(served.home)] + ([run] if run else [])
    proc = served.orch(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- start-up, auth, host check -----------------------------------------------------------


def test_first_line_is_the_url_with_the_token(served: Served) -> None:
    assert served.first_line.startswith("orch serve: http://127.0.0.1:")
    assert served.url == f"http://127.0.0.1:{served.port}/?token={TOKEN}"
    assert served.port > 0


def test_healthz_is_open_and_everything_else_needs_the_token(served: Served) -> None:
    assert httpx.get(served.base + "/healthz").json() == {"ok": True}
    for path in ("/", f"{V1}/runs", f"{V1}/version", f"{V1}/tasks", "/metrics", f"{V1}/events"):
        _error(httpx.get(served.base + path), 401)
        _error(httpx.get(served.base + path, headers={"Authorization": "Bearer nope"}), 401)
        _error(httpx.get(served.base + path, cookies={"orch_token": "nope"}), 401)
    _error(httpx.post(served.base + f"{V1}/runs", json={"task": "quick"}), 401)
    assert served.get(f"{V1}/version").json()["version"]


def test_token_in_the_query_sets_a_strict_httponly_cookie(served: Served) -> None:
    with httpx.Client(base_url=served.base) as c:
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert f"orch_token={TOKEN}" in cookie
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = c.get("/")  # the cookie alone is enough now
        assert page.status_code == 200 and "<title>orch</title>" in page.text
        assert c.get(f"{V1}/runs").status_code == 200
    r = httpx.get(served.base + f"{V1}/runs?token={TOKEN}")  # an API call with ?token= works too
    assert r.status_code == 200 and "orch_token" in r.headers["set-cookie"]


def test_host_header_must_name_the_server(served: Served) -> None:
    for host in ("evil.example", f"evil.example:{served.port}", f"127.0.0.1:{served.port + 1}"):
        _error(served.get(f"{V1}/runs", headers={"Host": host}), 403)
    _error(served.get("/healthz", headers={"Host": "rebound.example"}), 403)
    assert served.get(f"{V1}/runs", headers={"Host": f"localhost:{served.port}"}).status_code == 200


def test_cross_origin_posts_are_refused(served: Served) -> None:
    r = served.post(f"{V1}/runs", json={"task": "quick"}, headers={"Origin": "http://evil.example"})
    _error(r, 403)


def test_no_auth_is_refused_off_loopback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "orchestrator", "serve", "--host", "0.0.0.0", "--no-auth", "--port", "0"],
        env=orch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-auth" in lines[0] and "loopback" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    for args, words in (
        (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
        (["--port", "70000"], "--port"),
        (["--host", "no.such.host.invalid"], "no.such.host.invalid"),
    ):
        proc = subprocess.run(
            [PYTHON, "-m", "orchestrator", "serve", *args],
            env=orch_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


def test_read_only_refuses_every_change(tmp_path: Path) -> None:
    # (the token comes from $ORCH_TOKEN here)
    ro = Served(tmp_path, "--read-only", token_flag=False, env={"ORCH_TOKEN": TOKEN})
    try:
        assert ro.get(f"{V1}/runs").status_code == 200
        for path, body in (
            (f"{V1}/runs", {"task": "quick"}),
            (f"{V1}/runs/any/stop", {}),
            (f"{V1}/runs/any/scale", {"jobs": 2}),
            (f"{V1}/runs/any/shards/0/restart", {}),
        ):
            assert "read-only" in _error(ro.post(path, json=body), 403)
        assert not (tmp_path / "home" / "runs").exists()  # nothing was started
    finally:
        ro.stop()


# --- reads ----------------------------------------------------------------------------------


def test_start_a_task_and_read_it_like_orch_status(served: Served) -> None:
    r = served.post(f"{V1}/runs", json={"task": "quick"})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    served.wait_state(run_id, "done")
    listed = served.get(f"{V1}/runs").json()
    assert listed == _status_json(served)
    detail = served.run(run_id)
    expected = _status_json(served, run_id)
    assert detail == expected
    assert detail["counts"] == {"done": 3} and detail["items_done"] == 9
    assert served.get(f"{V1}/runs/quick").json()["id"] in {x["id"] for x in listed}  # by name


def test_bad_starts(served: Served) -> None:
    assert "unknown task" in _error(served.post(f"{V1}/runs", json={"task": "nope"}), 404)
    _error(served.post(f"{V1}/runs", json={"task": 5}), 422)
    _error(served.post(f"{V1}/runs", json={}), 422)
    _error(served.post(f"{V1}/runs", json={"task": "quick", "command": ["rm", "-rf", "/"]}), 422)
    _error(served.post(f"{V1}/runs", content=b"{not json"), 400)
    _error(served.post(f"{V1}/runs", content=b"[1, 2]"), 400)
    _error(served.post(f"{V1}/runs", content=b"\xff\xfe\x00garbage"), 400)
    _error(served.post(f"{V1}/runs", content=b"x" * (70 * 1024)), 413)
    _error(served.get(f"{V1}/runs/quick/stop"), 405)


def test_tasks_list_the_config_without_env_values(served: Served) -> None:
    tasks = served.get(f"{V1}/tasks").json()
    names = [t["name"] for t in tasks]
    assert names == ["quick", "pages", "steady", "slow", "medium", "hundred", "secret"]
    secret = next(t for t in tasks if t["name"] == "secret")
    assert list(secret["env"]) == ["API_KEY"] and SECRET not in json.dumps(tasks)


def test_shards_are_paginated(served: Served) -> None:
    run_id = served.start("pages")
    served.wait_state(run_id, "done")
    seen: list[str] = []
    cursor: str | None = "0"
    pages = 0
    while cursor is not None:
        page = served.get(f"{V1}/runs/{run_id}/shards", params={"limit": 10, "cursor": cursor})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["total"] == 25 and len(body["shards"]) <= 10
        seen += [s["id"] for s in body["shards"]]
        cursor = body["next_cursor"]
        pages += 1
    assert pages == 3 and seen == [str(i) for i in range(25)]
    desc = served.get(f"{V1}/runs/{run_id}/shards", params={"sort": "-index", "limit": 2}).json()
    assert [s["id"] for s in desc["shards"]] == ["24", "23"]
    done = served.get(f"{V1}/runs/{run_id}/shards", params={"state": "done"}).json()
    assert done["total"] == 25
    none = served.get(f"{V1}/runs/{run_id}/shards", params={"state": "failed,stopped"}).json()
    assert none == {"shards": [], "total": 0, "cursor": "0", "next_cursor": None}
    base = f"{V1}/runs/{run_id}/shards"
    for params in (
        {"state": "exploded"},
        {"sort": "colour"},
        {"limit": "0"},
        {"limit": "5000"},
        {"limit": "ten"},
        {"cursor": "-1"},
        {"cursor": "abc"},
    ):
        _error(served.get(base, params=params), 400)
    _error(served.get(f"{V1}/runs/no-such-run/shards"), 404)
    grid = served.get(f"{V1}/runs/{run_id}/grid").json()
    assert len(grid["cells"]) == 25 and set(grid["cells"]) == {str(grid["legend"].index("done"))}
    shard = served.get(f"{V1}/runs/{run_id}/shards/7").json()
    assert shard["id"] == "7" and shard["attempt_list"][0]["reason"] == "exit 0"
    _error(served.get(f"{V1}/runs/{run_id}/shards/nope"), 404)


def test_logs_with_offsets_and_tail(served: Served) -> None:
    run_id = served.start("quick")
    served.wait_state(run_id, "done")
    base = f"{V1}/runs/{run_id}/shards/1/logs"
    whole = served.get(base, params={"offset": 0}).json()
    assert "shard 1 starting" in whole["data"] and "shard 1 finished" in whole["data"]
    assert whole["offset"] == 0 and whole["next_offset"] == len(whole["data"].encode())
    first = served.get(base, params={"offset": 0, "limit": 10}).json()
    assert first["next_offset"] == 10 and whole["data"].startswith(first["data"])
    rest = served.get(base, params={"offset": 10}).json()
    assert first["data"] + rest["data"] == whole["data"]
    end = served.get(base, params={"offset": whole["next_offset"]}).json()
    assert end["data"] == "" and end["next_offset"] == whole["next_offset"]
    tail = served.get(base, params={"limit": 150}).json()  # no offset: the tail, from a line
    assert whole["data"].endswith(tail["data"]) and 0 < len(tail["data"]) < 150
    assert whole["data"][: -len(tail["data"])].endswith("\n")
    assert tail["offset"] + len(tail["data"].encode()) == tail["next_offset"]
    err = served.get(base, params={"stream": "stderr"}).json()["data"]
    assert "attempt 1 ended" in err and "shard 1 starting" not in err
    _error(served.get(base, params={"stream": "stdin"}), 400)
    _error(served.get(base, params={"offset": "-5"}), 400)
    _error(served.get(base, params={"limit": "huge"}), 400)
    _error(served.get(f"{V1}/runs/{run_id}/shards/99/logs"), 404)


# --- steering a live run --------------------------------------------------------------------


def test_steer_a_live_run(served: Served) -> None:
    run_id = served.start("slow")
    served.wait_running(run_id, 4)
    base = f"{V1}/runs/{run_id}"
    for body in ({"jobs": 0}, {"jobs": "2"}, {"jobs": True}, {"jobs": 2.5}, {}, {"jobs": 2**64}):
        _error(served.post(f"{base}/scale", json=body), 422)
    _error(served.post(f"{base}/scale", content=b"jobs=2"), 400)
    r = served.post(f"{base}/scale", json={"jobs": 5})
    assert r.status_code == 202, r.text
    assert poll_for(lambda: served.run(run_id)["jobs"] == 5)

    r = served.post(f"{base}/shards/2/restart")
    assert r.status_code == 202, r.text
    assert poll_for(lambda: served.get(f"{base}/shards/2").json()["attempts"] == 2, timeout=40)

    assert served.post(f"{base}/shards/3/stop").status_code == 202
    assert poll_for(lambda: served.get(f"{base}/shards/3").json()["state"] == "stopped")
    _error(served.post(f"{base}/shards/nope/restart"), 404)
    _error(served.post(f"{base}/shards/2/explode"), 404)
    _error(served.post(f"{V1}/runs/nope/stop"), 404)

    assert served.post(f"{base}/stop").status_code == 202
    served.wait_state(run_id, "stopped")
    _error(served.post(f"{base}/stop"), 409)
    _error(served.post(f"{base}/scale", json={"jobs": 2}), 409)
    _error(served.post(f"{base}/shards/0/restart"), 409)

    assert served.post(f"{base}/resume").status_code == 202
    served.wait_state(run_id, "running")
    _error(served.post(f"{base}/resume"), 409)
    assert served.post(f"{base}/stop").status_code == 202
    served.wait_state(run_id, "stopped")


def test_a_dead_master_shows_lost_and_resumes(served: Served) -> None:
    run_id = served.start("slow")
    before = served.wait_running(run_id, 4)
    pid = before["master_pid"]
    os.kill(pid, signal.SIGKILL)
    lost = served.wait_state(run_id, "lost")
    assert lost["shard_count"] == 4 and lost["counts"]  # the last known state
    assert served.post(f"{V1}/runs/{run_id}/resume").status_code == 202
    served.wait_state(run_id, "running")
    assert served.post(f"{V1}/runs/{run_id}/stop").status_code == 202
    served.wait_state(run_id, "stopped")


# --- events -----------------------------------------------------------------------------------


class _Reader:
    """Reads a streaming response in a thread, keeping what arrived."""

    def __init__(self, served: Served, path: str, headers: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.status = 0
        self._client = httpx.Client(
            base_url=served.base,
            headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})},
            timeout=httpx.Timeout(60, read=60),
        )
        self._stop = False
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._read, args=(path,), daemon=True)
        self._t.start()
        assert self.ready.wait(30)

    def _read(self, path: str) -> None:
        try:
            with self._client.stream("GET", path) as r:
                self.status = r.status_code
                self.ready.set()
                for line in r.iter_lines():
                    self.lines.append(line)
                    if self._stop:
                        return
        except (httpx.HTTPError, OSError):
            if not self._stop:
                raise

    def close(self) -> None:
        self._stop = True
        self._client.close()

    def events(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(id, data) of each SSE event so far."""
        out: list[tuple[str | None, dict[str, Any]]] = []
        ev_id = None
        for line in list(self.lines):
            if line.startswith("id:"):
                ev_id = line[3:].strip()
            elif line.startswith("data:"):
                out.append((ev_id, json.loads(line[5:].strip())))
        return out


def test_sse_state_changes_and_resume(served: Served) -> None:
    reader = _Reader(served, f"{V1}/events")
    try:
        assert reader.status == 200
        run_id = served.start("medium")  # about 2 s; shard 1 fails, so the run does too

        def done_event() -> Any:
            return next(
                (
                    (i, e)
                    for i, e in reader.events()
                    if e.get("run") == run_id and e.get("type") == "run" and e["state"] == "failed"
                ),
                None,
            )

        assert poll_for(done_event, timeout=60), reader.lines[-20:]
        shard_events = [
            (i, e) for i, e in reader.events() if e.get("type") == "shard" and e["run"] == run_id
        ]
        assert shard_events, reader.events()
        assert {"run", "shard", "state"} <= set(shard_events[0][1])
        # (a shard's start may come before serve subscribed to this brand-new master)
        assert {e["state"] for _, e in shard_events} >= {"done", "failed"}
        ids = [int(i) for i, _ in reader.events() if i is not None]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    finally:
        reader.close()
    # Resume: everything after the first shard event, and nothing before it.
    first_id = shard_events[0][0]
    assert first_id is not None
    again = _Reader(served, f"{V1}/events", headers={"Last-Event-ID": first_id})
    try:
        assert poll_for(
            lambda: any(
                e.get("type") == "run" and e.get("run") == run_id for _, e in again.events()
            )
        )
        resumed = [int(i) for i, _ in again.events() if i is not None]
        assert resumed and min(resumed) == int(first_id) + 1
    finally:
        again.close()
    stale = _Reader(served, f"{V1}/events", headers={"Last-Event-ID": "12"})
    try:
        assert poll_for(lambda: any(e.get("type") == "reset" for _, e in stale.events()))
    finally:
        stale.close()
    _error(served.get(f"{V1}/events", headers={"Last-Event-ID": "abc"}), 400)


def test_ndjson_events_for_one_run(served: Served) -> None:
    run_id = served.start("slow")
    reader = _Reader(served, f"{V1}/events?format=ndjson&run={run_id}")
    try:
        served.wait_running(run_id, 4)
        assert served.post(f"{V1}/runs/{run_id}/stop").status_code == 202

        def stopped() -> bool:
            events = [json.loads(ln) for ln in list(reader.lines) if ln.strip()]
            return any(e.get("type") == "run" and e["state"] == "stopped" for e in events)

        assert poll_for(stopped, timeout=40), reader.lines[-10:]
        events = [json.loads(ln) for ln in list(reader.lines) if ln.strip()]
        assert all(e["run"] == run_id and isinstance(e["id"], int) for e in events)
        assert any(e.get("type") == "shard" and e["state"] == "stopped" for e in events)
    finally:
        reader.close()
    _error(served.get(f"{V1}/events?format=xml"), 400)
    _error(served.get(f"{V1}/events?run=no-such-run"), 404)


# --- metrics ------------------------------------------------------------------------------------


def _families(served: Served) -> dict[str, Any]:
    r = served.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metrics_parse_and_add_up(served: Served) -> None:
    run_id = served.start("slow")
    served.wait_running(run_id, 4)
    work = str(served.cwd / "work.py")
    proc = served.orch(
        "run", "--split", "101", "-j", "2", "--name", "big", "-d", "--",
        PYTHON, work, "{index}", "600", "0.1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    big = proc.stdout.strip().splitlines()[-1]  # an ad-hoc command: its job is its name
    served.wait_running(big, 2)
    try:
        fams = _families(served)
        for name in (
            "orch_run_info",
            "orch_shards",
            "orch_items_done",  # counters lose _total in the parsed family name
            "orch_items_expected",
            "orch_shard_restarts",
            "orch_shard_failures",
            "orch_run_start_timestamp_seconds",
            "orch_run_estimated_completion_timestamp_seconds",
            "orch_heartbeat_oldest_timestamp_seconds",
            "orch_progress_oldest_timestamp_seconds",
            "orch_concurrency_jobs",
            "orch_metrics_shards_omitted",
        ):
            assert name in fams, name
        info = [s for s in fams["orch_run_info"].samples if s.labels["run"] == run_id]
        assert info and info[0].labels == {"run": run_id, "job": "slow", "state": "running"}
        slow = [s for s in fams["orch_shards"].samples if s.labels["job"] == "slow"]
        assert sum(s.value for s in slow) == 4
        big_shards = [s for s in fams["orch_shards"].samples if s.labels["job"] == "big"]
        assert sum(s.value for s in big_shards) == 101
        omitted = {s.labels["job"]: s.value for s in fams["orch_metrics_shards_omitted"].samples}
        assert omitted == {"big": 101}
        per_shard = fams["orch_shard_items_done"].samples
        assert {s.labels["shard"] for s in per_shard if s.labels["job"] == "slow"} == {
            "0",
            "1",
            "2",
            "3",
        }
        assert not [s for s in per_shard if s.labels["job"] == "big"]
        assert all(
            "run" not in s.labels
            for f in fams.values()
            if f.name != "orch_run_info"
            for s in f.samples
        )
        jobs = {s.labels["job"]: s.value for s in fams["orch_concurrency_jobs"].samples}
        assert jobs["slow"] == 4 and jobs["big"] == 2
    finally:
        for r in (run_id, big):
            served.post(f"{V1}/runs/{r}/stop")
        served.wait_state(run_id, "stopped")
        served.wait_state(big, "stopped")


# --- secrets and garbage ---------------------------------------------------------------


def test_env_values_are_never_returned(served: Served) -> None:
    reader = _Reader(served, f"{V1}/events?format=ndjson")
    run_id = served.start("secret")
    served.wait_state(run_id, "done")
    assert poll_for(lambda: any(run_id in ln and '"done"' in ln for ln in list(reader.lines)))
    reader.close()
    raw = (served.home / "runs" / run_id / "task.json").read_text()
    assert SECRET in raw  # it is in the store, so the check below means something
    bodies = []
    for path in (
        f"{V1}/runs",
        f"{V1}/runs/{run_id}",
        f"{V1}/runs/{run_id}?shards=0",
        f"{V1}/runs/{run_id}/shards",
        f"{V1}/runs/{run_id}/shards/0",
        f"{V1}/runs/{run_id}/shards/0/logs",
        f"{V1}/runs/{run_id}/grid",
        f"{V1}/runs/{run_id}/attention",
        f"{V1}/runs/{run_id}/stats",
        f"{V1}/tasks",
        "/metrics",
        "/",
        f"/runs/{run_id}",
    ):
        r = served.get(path)
        assert r.status_code == 200, (path, r.text)
        bodies.append(r.text)
    bodies += reader.lines
    assert all(SECRET not in b for b in bodies)
    assert served.run(run_id)["task"]["env"] == {"API_KEY": "<redacted>"}


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/api/v1/runs/%00"),
        ("GET", "/api/v1/runs/..%2F..%2Fetc"),
        ("GET", "/api/v1/runs/%E2%98%83/shards/x/logs"),
        ("GET", "/api/v1/nothing"),
        ("GET", "/static/../../etc/passwd"),
        ("DELETE", "/api/v1/runs"),
        ("PUT", "/api/v1/runs/x/stop"),
        ("POST", "/api/v1/runs/x/shards/y/restart"),
        ("GET", "/api/v1/runs/x/shards?limit=99999999999999999999"),
        ("GET", "/api/v1/events?format=json"),
    ],
)
def test_garbage_gets_a_json_4xx(served: Served, method: str, path: str) -> None:
    r = served.client.request(method, path)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 404 or path.startswith("/api"):
        assert "error" in r.json()
    assert "Traceback" not in r.text


def test_other_commands_never_import_the_web_stack(served: Served) -> None:
    proc = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "orchestrator", "status", "--home", str(served.home)],
        env=orch_env(served.home),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "orchestrator.cli" in proc.stderr  # the import log is there
    for module in ("starlette", "uvicorn", "sse_starlette", "orchestrator.serve"):
        assert f" {module}" not in proc.stderr, module
