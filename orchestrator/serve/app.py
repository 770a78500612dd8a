"""The routes of ``orch serve``: JSON API under /api/v1, events, /metrics, the dashboard.

Every error is ``{"error": "..."}`` with a 4xx status; bad input never
reaches a 500 (and an unexpected bug answers a JSON 500 without a
traceback). Endpoints that read stores are plain functions, which Starlette
runs in its thread pool, so a slow disk never stalls the event stream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from orchestrator.serve import data, metrics
from orchestrator.serve.hub import Hub

STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_LOG_BYTES = 1024 * 1024
DEFAULT_LOG_BYTES = 64 * 1024
MAX_JOBS = 2**63 - 1


@dataclass(frozen=True)
class Settings:
    """Everything ``orch serve`` was told, built once at the command line."""

    home: str
    config_path: str | None
    read_only: bool = False
    shard_series_max: int = 100
    metrics_recent_s: float = 3600.0


class ApiError(Exception):
    """Raised by a handler to answer ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status, headers={"cache-control": "no-store"})


# --- input ---------------------------------------------------------------------


def _int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer, not {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be from {lo} to {hi}")
    return value


async def _body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


# --- run lookups -----------------------------------------------------------------


class Api:
    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.s = settings
        self.hub = hub

    def _run_dir(self, request: Request) -> data.RunDir:
        key = request.path_params["run"]
        try:
            return data.resolve(self.s.home, key)
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None

    def _facts(self, run_dir: data.RunDir) -> data.RunFacts:
        facts = data.run_facts(run_dir)
        if facts is None:
            raise ApiError(404, f"run {run_dir.id} cannot be read")
        return facts

    def _live(self, run_dir: data.RunDir) -> data.RunFacts:
        f = self._facts(run_dir)
        if f.state == "lost":
            raise ApiError(409, f"run {f.id} lost its master; resume it first")
        if f.state != "running" or not f.control:
            raise ApiError(409, f"run {f.id} is not running (it is {f.state})")
        return f

    def _send(self, f: data.RunFacts, op: str, **fields: Any) -> dict[str, Any]:
        assert f.control is not None
        try:
            reply = data.send(f.control, op, **fields)
        except data.MasterUnreachable as exc:
            raise ApiError(409, f"run {f.id}: {exc}") from None
        if not reply.get("ok"):
            raise ApiError(409, f"run {f.id}: {reply.get('error', 'request refused')}")
        return reply

    # --- reads -------------------------------------------------------------------

    def runs(self, request: Request) -> JSON:
        return JSON(data.list_runs(self.s.home))

    def run(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        try:
            return JSON(data.run_detail(run_dir, shards=request.query_params.get("shards") != "0"))
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None

    def shards(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        raw_states = request.query_params.get("state") or ""
        states = [s for s in raw_states.split(",") if s]
        bad = [s for s in states if s not in data.STATES]
        if bad:
            raise ApiError(400, f"unknown state {bad[0]!r} (known: {', '.join(data.STATES)})")
        sort = request.query_params.get("sort") or "index"
        desc = sort.startswith("-")
        sort = sort.lstrip("-")
        if sort not in data.SORTS:
            raise ApiError(400, f"unknown sort {sort!r} (known: {', '.join(data.SORTS)})")
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        cursor = request.query_params.get("cursor") or "0"
        if not cursor.isdigit() or len(cursor) > 12:
            raise ApiError(400, f"bad cursor {cursor[:40]!r} (use next_cursor from the last page)")
        offset = int(cursor)
        assert limit is not None
        try:
            page, total = data.shard_page(
                run_dir, states=states, sort=sort, desc=desc, offset=offset, limit=limit
            )
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None
        nxt = offset + len(page)
        return JSON(
            {
                "shards": page,
                "total": total,
                "cursor": str(offset),
                "next_cursor": str(nxt) if nxt < total else None,
            }
        )

    def grid(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        try:
            states = data.shard_states(run_dir)
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None
        legend = list(data.STATES)
        code = {s: str(i) for i, s in enumerate(legend)}
        return JSON({"legend": legend, "cells": "".join(code.get(s, "0") for s in states)})

    def attention(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        limit = _int_param(request, "limit", 20, 1, 200)
        assert limit is not None
        try:
            return JSON({"shards": data.attention(run_dir, limit, 2048)})
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None

    def stats(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        f = self._facts(run_dir)
        return JSON(self.hub.stats(f.id) or {"run": f.id, "rate": None, "eta_s": None, "spark": []})

    def shard(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        f = self._facts(run_dir)
        try:
            return JSON(
                data.shard_detail(run_dir, request.path_params["shard"], f.state == "running")
            )
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None

    def logs(self, request: Request) -> JSON:
        run_dir = self._run_dir(request)
        stream = request.query_params.get("stream") or "stdout"
        if stream not in ("stdout", "stderr"):
            raise ApiError(400, f"'stream' must be stdout or stderr, not {stream[:40]!r}")
        offset = _int_param(request, "offset", None, 0, 2**62)
        limit = _int_param(request, "limit", DEFAULT_LOG_BYTES, 1, MAX_LOG_BYTES)
        assert limit is not None
        try:
            out = data.log_slice(run_dir, request.path_params["shard"], stream, offset, limit)
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None
        return JSON(out)

    def tasks(self, request: Request) -> JSON:
        if self.s.config_path is None:
            return JSON([])
        try:
            return JSON(data.task_list(self.s.config_path))
        except data.OrchError as exc:
            raise ApiError(422, str(exc)) from None

    # --- mutations -----------------------------------------------------------------

    async def start(self, request: Request) -> JSON:
        body = await _body(request)
        name = body.get("task")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "'task' must be the name of a task of orch.toml")
        extra = sorted(set(body) - {"task"})
        if extra:
            raise ApiError(422, f"unknown field {extra[0]!r}: only named tasks can be started")
        if self.s.config_path is None:
            raise ApiError(404, f"unknown task {name!r}: orch serve has no orch.toml")
        try:
            names = await asyncio.to_thread(data.task_names, self.s.config_path)
        except data.OrchError as exc:
            raise ApiError(422, str(exc)) from None
        if name not in names:
            raise ApiError(404, f"unknown task {name!r} (known: {', '.join(names) or 'none'})")
        try:
            run_id = await asyncio.to_thread(data.start_task, self.s.config_path, name, self.s.home)
        except data.StartFailed as exc:
            raise ApiError(422 if exc.usage else 409, str(exc)) from None
        return JSON({"id": run_id}, status_code=202)

    async def stop(self, request: Request) -> JSON:
        await _body(request)
        run_dir = self._run_dir(request)
        f = self._live(run_dir)
        await asyncio.to_thread(self._send, f, "stop")
        return JSON({"id": f.id, "accepted": "stop"}, status_code=202)

    async def resume(self, request: Request) -> JSON:
        await _body(request)
        run_dir = self._run_dir(request)
        f = self._facts(run_dir)
        if f.state == "running":
            raise ApiError(409, f"run {f.id} is running")
        if f.state == "done":
            raise ApiError(409, f"run {f.id} is done: nothing to resume")
        try:
            await asyncio.to_thread(data.resume_run, f.id, self.s.home)
        except data.StartFailed as exc:
            raise ApiError(409, str(exc)) from None
        return JSON({"id": f.id, "accepted": "resume"}, status_code=202)

    async def scale(self, request: Request) -> JSON:
        body = await _body(request)
        jobs = body.get("jobs")
        if type(jobs) is not int or not 1 <= jobs <= MAX_JOBS:
            raise ApiError(422, f"'jobs' must be an integer from 1 to {MAX_JOBS}")
        run_dir = self._run_dir(request)
        f = self._live(run_dir)
        await asyncio.to_thread(self._send, f, "scale", jobs=jobs)
        return JSON({"id": f.id, "accepted": "scale", "jobs": jobs}, status_code=202)

    async def shard_verb(self, request: Request) -> JSON:
        await _body(request)
        verb = request.path_params["verb"]
        if verb not in ("restart", "stop"):
            raise ApiError(404, f"no such action {verb!r}")
        run_dir = self._run_dir(request)
        try:
            shard = await asyncio.to_thread(data.shard_id, run_dir, request.path_params["shard"])
        except data.OrchError as exc:
            raise ApiError(404, str(exc)) from None
        f = self._live(run_dir)
        await asyncio.to_thread(self._send, f, verb, shard=shard)
        return JSON({"id": f.id, "shard": shard, "accepted": verb}, status_code=202)

    # --- events ----------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        fmt = request.query_params.get("format") or "sse"
        if fmt not in ("sse", "ndjson"):
            raise ApiError(400, f"'format' must be sse or ndjson, not {fmt[:40]!r}")
        raw_last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        last: int | None = None
        if raw_last:
            try:
                last = int(raw_last)
            except ValueError:
                raise ApiError(400, f"bad Last-Event-ID {raw_last[:40]!r}") from None
        run_filter = request.query_params.get("run") or None
        if run_filter is not None:
            run_dir = await asyncio.to_thread(self._run_dir, request_with_run(request, run_filter))
            facts = await asyncio.to_thread(self._facts, run_dir)
            run_filter = facts.id
        hub = self.hub
        start = hub.last_id if last is None else last

        async def stream() -> AsyncIterator[tuple[int | None, dict[str, Any]]]:
            cursor = start
            while True:
                batch = hub.since(cursor)
                if batch is None:
                    cursor = hub.last_id
                    yield cursor, {"type": "reset"}
                    continue
                for ev_id, ev in batch:
                    cursor = ev_id
                    if run_filter is None or ev.get("run") == run_filter:
                        yield ev_id, ev
                if await request.is_disconnected():
                    return
                await hub.wait(15.0)
                if not batch and hub.last_id == cursor:
                    yield None, {}  # keep-alive

        if fmt == "ndjson":

            async def lines() -> AsyncIterator[bytes]:
                async for ev_id, ev in stream():
                    if ev_id is None:
                        yield b"\n"
                        continue
                    yield orjson.dumps({"id": ev_id, **ev}) + b"\n"

            return StreamingResponse(
                lines(),
                media_type="application/x-ndjson",
                headers={"cache-control": "no-store", "x-accel-buffering": "no"},
            )

        async def sse() -> AsyncIterator[ServerSentEvent]:
            yield ServerSentEvent(retry=1000, comment="orch")
            async for ev_id, ev in stream():
                if ev_id is None:
                    yield ServerSentEvent(comment="keep-alive")
                    continue
                yield ServerSentEvent(data=orjson.dumps(ev).decode(), id=str(ev_id))

        return EventSourceResponse(sse(), headers={"cache-control": "no-store"})

    def metrics(self, request: Request) -> Response:
        text = metrics.render(
            self.hub,
            shard_series_max=self.s.shard_series_max,
            recent_s=self.s.metrics_recent_s,
        )
        return Response(text, media_type=metrics.CONTENT_TYPE)


def request_with_run(request: Request, run: str) -> Request:
    """The same request with ``run`` as its path parameter (for ``/events?run=``)."""
    scope = dict(request.scope)
    scope["path_params"] = {**request.path_params, "run": run}
    return Request(scope)


def _page(request: Request) -> FileResponse:
    return FileResponse(os.path.join(STATIC, "index.html"), headers={"cache-control": "no-store"})


def build_app(settings: Settings, hub: Hub | None = None) -> Starlette:
    hub = hub or Hub(settings.home)
    api = Api(settings, hub)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    async def handled(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            return _error(exc.status, exc.message)
        if isinstance(exc, HTTPException):
            text = {404: "not found", 405: "method not allowed"}.get(
                exc.status_code, str(exc.detail)
            )
            if exc.status_code == 405:
                text += " (changes are POST only)" if request.method == "GET" else ""
            return _error(exc.status_code, text)
        print(f"orch serve: {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return _error(500, "internal error (see orch serve's output)")

    async def healthz(request: Request) -> JSON:
        return JSON({"ok": True})

    async def version(request: Request) -> JSON:
        return JSON({"version": data.VERSION, "api": "v1"})

    v1 = "/api/v1"
    routes = [
        Route("/", _page),
        Route("/runs/{run}", _page),
        Route("/healthz", healthz),
        Route("/metrics", api.metrics),
        Route(f"{v1}/healthz", healthz),
        Route(f"{v1}/version", version),
        Route(f"{v1}/tasks", api.tasks),
        Route(f"{v1}/events", api.events),
        Route(f"{v1}/runs", api.runs, methods=["GET"]),
        Route(f"{v1}/runs", api.start, methods=["POST"]),
        Route(f"{v1}/runs/{{run}}", api.run),
        Route(f"{v1}/runs/{{run}}/shards", api.shards),
        Route(f"{v1}/runs/{{run}}/grid", api.grid),
        Route(f"{v1}/runs/{{run}}/attention", api.attention),
        Route(f"{v1}/runs/{{run}}/stats", api.stats),
        Route(f"{v1}/runs/{{run}}/stop", api.stop, methods=["POST"]),
        Route(f"{v1}/runs/{{run}}/resume", api.resume, methods=["POST"]),
        Route(f"{v1}/runs/{{run}}/scale", api.scale, methods=["POST"]),
        Route(f"{v1}/runs/{{run}}/shards/{{shard}}", api.shard),
        Route(f"{v1}/runs/{{run}}/shards/{{shard}}/logs", api.logs),
        Route(f"{v1}/runs/{{run}}/shards/{{shard}}/{{verb}}", api.shard_verb, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: handled, HTTPException: handled, ApiError: handled},
    )
