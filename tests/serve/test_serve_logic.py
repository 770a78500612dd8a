"""``orch serve``'s logic without processes: the guard, the hub's ids and rates, metrics text."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.serve import data
from orchestrator.serve.guard import Guard
from orchestrator.serve.hub import Hub, Watched
from orchestrator.serve.main import allowed_hosts, is_loopback
from orchestrator.serve.metrics import _Job, _reason_class, _write

# --- the guard, called as an ASGI app ------------------------------------------------------


async def _ok_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(
    guard: Guard,
    path: str = "/api/v1/runs",
    *,
    method: str = "GET",
    host: str = "127.0.0.1:9001",
    headers: dict[str, str] | None = None,
    query: str = "",
) -> tuple[int, dict[str, str], bytes]:
    hdrs = [(b"host", host.encode())] + [
        (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
    ]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": hdrs,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    out_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], out_headers, body


def _guard(**kw: Any) -> Guard:
    kw.setdefault("token", "T0K")
    kw.setdefault("hosts", allowed_hosts("127.0.0.1", 9001))
    kw.setdefault("read_only", False)
    return Guard(_ok_app, **kw)


def test_token_paths() -> None:
    g = _guard()
    status, headers, body = _call(g)
    assert status == 401 and "error" in orjson.loads(body)
    assert headers["www-authenticate"].startswith("Bearer")
    assert _call(g, headers={"Authorization": "Bearer T0K"})[0] == 200
    assert _call(g, headers={"Authorization": "bearer T0K"})[0] == 200
    assert _call(g, headers={"Authorization": "Bearer T0KX"})[0] == 401
    assert _call(g, headers={"Authorization": "Basic T0K"})[0] == 401
    assert _call(g, headers={"Cookie": "orch_token=T0K"})[0] == 200
    assert _call(g, headers={"Cookie": "orch_token=nope; other=1"})[0] == 401
    assert _call(g, headers={"Cookie": '"""garbage'})[0] == 401
    assert _call(g, "/healthz")[0] == 200
    assert _call(g, "/healthz", method="POST")[0] == 401


def test_query_token_sets_cookie_and_pages_redirect() -> None:
    g = _guard()
    status, headers, _ = _call(g, "/api/v1/runs", query="token=T0K")
    assert status == 200 and headers["set-cookie"].startswith("orch_token=T0K;")
    status, headers, _ = _call(g, "/runs/abc", query="token=T0K&x=1")
    assert status == 303 and headers["location"] == "/runs/abc?x=1"
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert _call(g, "/", query="token=wrong")[0] == 401


def test_host_check_read_only_and_origin() -> None:
    g = _guard(read_only=True)
    auth = {"Authorization": "Bearer T0K"}
    assert _call(g, host="evil.example:9001", headers=auth)[0] == 403
    assert _call(g, host="localhost:9001", headers=auth)[0] == 200
    assert _call(g, host="[::1]:9001", headers=auth)[0] == 200
    assert _call(g, host="127.0.0.1:9002", headers=auth)[0] == 403
    assert _call(g, method="POST", headers=auth)[0] == 403  # read-only
    w = _guard(hosts=None)  # a wildcard bind takes any name, still with the token
    assert _call(w, host="box.lan:9001", headers=auth)[0] == 200
    assert _call(w, host="box.lan:9001")[0] == 401
    rw = _guard()
    cross = {**auth, "Origin": "http://evil.example"}
    assert _call(rw, method="POST", headers=cross)[0] == 403
    assert _call(rw, method="POST", headers={**auth, "Origin": "null"})[0] == 403
    same = {**auth, "Origin": "http://127.0.0.1:9001"}
    assert _call(rw, method="POST", headers=same)[0] == 200
    open_ = _guard(token=None)
    assert _call(open_)[0] == 200


def test_loopback_and_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("example.com")
    assert allowed_hosts("0.0.0.0", 80) is None
    hosts = allowed_hosts("10.1.2.3", 8080)
    assert hosts == frozenset({"10.1.2.3:8080"})


# --- the hub ----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_event_ids_resume_and_reset() -> None:
    clock = _Clock()
    hub = Hub("/nonexistent", buffer=3, clock=clock)
    first = hub.last_id
    assert first == 1_000_000_000 and hub.since(first) == []
    for i in range(5):
        hub.publish({"n": i})
    assert hub.since(hub.last_id - 2) == [(first + 4, {"n": 3}), (first + 5, {"n": 4})]
    assert hub.since(first + 2) == [
        (first + 3, {"n": 2}),
        (first + 4, {"n": 3}),
        (first + 5, {"n": 4}),
    ]
    assert hub.since(first + 1) is None  # event first+2 fell out of the buffer
    assert hub.since(12) is None  # an id from another start
    assert hub.since(hub.last_id + 10) is None
    later = Hub("/nonexistent", clock=lambda: 1001.0)
    assert later.first_id > hub.last_id  # a restarted serve never reuses ids


def _facts(run_id: str = "r1") -> data.RunFacts:
    return data.RunFacts(
        id=run_id,
        name="n",
        job="j",
        state="running",
        run_dir=data.RunDir("/x"),
        control=None,
        shard_count=2,
        jobs=2,
        started_at=0.0,
        ended_at=None,
        exit_code=None,
    )


def test_rate_and_sparkline_from_samples() -> None:
    hub = Hub("/nonexistent", clock=_Clock())
    w = Watched(facts=_facts())
    assert hub.rate(w) is None and hub.spark(w) == []
    for s in range(0, 121):  # 10 items a second for two minutes
        w.samples.append((1000.0 + s, 10 * s, s // 10))
    assert hub.rate(w) == 10.0
    assert hub.rate(w, 2) == 0.1  # finished shards a second
    spark = hub.spark(w)
    assert spark and all(abs(x - 10.0) < 1e-9 for x in spark)
    w.samples.append((1121.0, 1200, 12))  # stalled for the last second
    assert hub.rate(w) is not None and hub.rate(w) < 10.0  # type: ignore[operator]


def test_progress_events_only_when_something_moved() -> None:
    hub = Hub("/nonexistent", clock=_Clock())
    w = Watched(facts=_facts())
    agg = {"counts": {"running": 2}, "items_done": 5, "items_total": None,
           "items_total_estimate": 10}  # fmt: skip
    hub._progress(w, 1.0, agg=dict(agg))
    hub._progress(w, 2.0, agg=dict(agg))
    events = hub.since(hub.first_id) or []
    assert len(events) == 1 and events[0][1]["type"] == "progress"
    hub._progress(w, 3.0, agg={**agg, "items_done": 6})
    assert len(hub.since(hub.first_id) or []) == 2


# --- metrics text -------------------------------------------------------------------------------


def test_metrics_text_parses_and_escapes() -> None:
    j = _Job()
    j.states["running"] = 3
    j.done = 42
    j.restarts[_reason_class("exit 3")] += 2
    j.restarts[_reason_class("no heartbeat for 10s")] += 1
    text = _write(
        [({"run": "r1", "job": 'we"ird\\job', "state": "running"}, 1)], {'we"ird\\job': j}
    )
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    info = fams["orch_run_info"].samples[0]
    assert info.labels["job"] == 'we"ird\\job' and info.value == 1
    assert sum(s.value for s in fams["orch_shards"].samples) == 3
    assert fams["orch_items_done"].type == "counter"
    assert {s.labels["reason"]: s.value for s in fams["orch_shard_restarts"].samples} == {
        "exit": 2.0,
        "heartbeat": 1.0,
    }
    assert [s.value for s in fams["orch_items_expected"].samples] == [0.0]


def test_reason_classes_are_bounded() -> None:
    assert _reason_class("exit 1") == "exit"
    assert _reason_class("killed by SIGKILL") == "signal"
    assert _reason_class("no progress for 30s (stalled)") == "stalled"
    assert _reason_class("restarted by user") == "user"
    assert _reason_class("something new") == "other"
