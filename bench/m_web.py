"""``orch serve`` (metric family ``web``): the dashboard, the API and /metrics under load.

    python -m bench --only web          # through the runner (a row per figure)
    python -m bench.m_web [--quick]     # on its own, printing the figures

Figures (targets from the issue):

- dashboard first render of a live 1,000-shard run (≤ 1 s): a fresh browser
  page from navigation until the grid holds every shard and the table its
  first page; side by side, supervisor's web page (``[inet_http_server]``)
  loading 1,000 programs;
- a state change visible in the page (≤ 1 s): from the master's own
  timestamp of a shard's state change to the page's event handler;
- 10,000-shard run page render (≤ 2 s);
- ``GET /api/v1/runs/{run}`` for 1,000 live shards (≤ 50 ms), next to
  ``supervisorctl status`` (a new process each call) for 1,000 programs;
- ``/metrics`` for 10 live runs of 1,000 shards (≤ 100 ms);
- serve's idle CPU (≤ 0.5 % of a core) and RSS (≤ 80 MiB) with a live
  1,000-shard run and no client.

Live shards are ``sleep`` processes: what is measured is serve, not the work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

from bench.common import (
    ORCH,
    SLEEP,
    Config,
    Row,
    Skip,
    base_env,
    become_subreaper,
    cell,
    cpu_ns,
    kill_everything,
    launch,
    log,
    rss_mib,
    run_cmd,
)

TOKEN = "bench-token"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _wait(pred: Any, timeout_s: float, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


class _Serve:
    def __init__(self, home: str, workdir: str) -> None:
        self.out_path = os.path.join(workdir, "serve.out")
        with open(self.out_path, "wb") as out:
            self.proc = launch(
                [*ORCH, "serve", "--port", "0", "--home", home, "--token", TOKEN],
                env=base_env(),
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        line = _wait(self._line, 30)
        if not line:
            raise RuntimeError(f"orch serve did not start: {self._text()[-300:]}")
        self.url = line.split("orch serve: ", 1)[1].strip()
        self.base = self.url.split("/?", 1)[0]
        import httpx

        self.http = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )
        _wait(lambda: self._ok("/healthz"), 30)

    def _text(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def _line(self) -> str | None:
        text = self._text()
        return text.split("\n", 1)[0] if "\n" in text else None

    def _ok(self, path: str) -> bool:
        try:
            return self.http.get(path).status_code == 200
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def timed_get(self, path: str) -> float:
        t0 = time.perf_counter()
        r = self.http.get(path)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:200]}")
        return dt

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _run(home: str, workdir: str, n: int, jobs: int, name: str) -> str:
    argv = [*ORCH, "run", "--home", home, "--split", str(n), "-j", str(jobs), "--name", name]
    argv += ["--stop-timeout", "1s", "-d", "--", SLEEP, "3600"]
    out = run_cmd(argv, 180, env=base_env())
    if out.returncode != 0:
        raise RuntimeError(f"orch run: {out.stderr.strip()[-200:]}")
    return out.stdout.split()[-1]


def _running(serve: _Serve, run_id: str, n: int, timeout_s: float = 240) -> bool:
    def ok() -> bool:
        r = serve.http.get(f"/api/v1/runs/{run_id}?shards=0").json()
        return int(r["counts"].get("running", 0)) >= n

    return bool(_wait(ok, timeout_s, 0.25))


def _stop(home: str, run_id: str) -> None:
    run_cmd([*ORCH, "stop", run_id, "--home", home], 30, env=base_env())


# --- browser -------------------------------------------------------------------------------


def _browser() -> Any:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise Skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)


def _render_s(browser: Any, serve: _Serve, run_id: str, n: int) -> float:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(serve.url)  # sets the cookie (the runs list)
    t0 = time.perf_counter()
    page.goto(f"{serve.base}/runs/{run_id}")
    page.wait_for_function(
        f"typeof R !== 'undefined' && R.cells.length === {n} && "
        "document.querySelectorAll('#shards-table tbody tr').length > 0",
        polling="raf",
        timeout=30_000,
    )
    dt = time.perf_counter() - t0
    ctx.close()
    return dt


def _change_latency_s(browser: Any, serve: _Serve, run_id: str, shards: list[str]) -> list[float]:
    """Master's timestamp of a shard stop -> the page's handler, for each shard in turn."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(serve.url)
    page.goto(f"{serve.base}/runs/{run_id}")
    page.wait_for_function("typeof source !== 'undefined' && source.readyState === 1")
    out = []
    for shard in shards:
        page.evaluate(
            """(shard) => { window.__lat = null; source.addEventListener('message', (m) => {
                 const e = JSON.parse(m.data);
                 if (e.type === 'shard' && e.shard === shard && e.state === 'stopped')
                   window.__lat = Date.now() / 1000 - e.t; }); }""",
            shard,
        )
        r = serve.http.post(f"/api/v1/runs/{run_id}/shards/{shard}/stop")
        if r.status_code != 202:
            raise RuntimeError(r.text)
        page.wait_for_function("window.__lat !== null", timeout=30_000)
        out.append(float(page.evaluate("window.__lat")))
    ctx.close()
    return out


# --- supervisor -------------------------------------------------------------------------------


def _supervisor(workdir: str, n: int) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    from bench.peers import require

    binary = require("supervisor")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    conf = os.path.join(workdir, "supervisord.conf")
    lines = [
        "[inet_http_server]",
        f"port=127.0.0.1:{port}",
        "[supervisord]",
        f"logfile={workdir}/supervisord.log",
        f"pidfile={workdir}/sup.pid",
        "nodaemon=true",
        f"childlogdir={workdir}",
        "minfds=20000",
        "minprocs=1000",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl=http://127.0.0.1:{port}",
        "[program:w]",
        f"command={SLEEP} 3600",
        f"numprocs={n}",
        "process_name=%(program_name)s_%(process_num)04d",
        "startsecs=0",
        "stdout_logfile=NONE",
        "stderr_logfile=NONE",
    ]
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    proc = launch([binary, "-c", conf], cwd=workdir, env=base_env())
    ctl = [os.path.join(os.path.dirname(binary), "supervisorctl"), "-c", conf, "status"]
    return proc, f"http://127.0.0.1:{port}/", ctl


def _supervisor_running(ctl: list[str], n: int) -> bool:
    out = run_cmd(ctl, 300, env=base_env())
    return out.stdout.count("RUNNING") >= n


# --- the family ----------------------------------------------------------------------------------


def web(cfg: Config) -> list[Row]:
    n = 200 if cfg.quick else 1000
    big = 2000 if cfg.quick else 10_000
    runs_for_metrics = 3 if cfg.quick else 10
    rounds = max(3, cfg.repeat * 2)
    workdir = cfg.sub("web")
    home = os.path.join(workdir, "h")
    fig: dict[str, list[float]] = {}
    text: dict[str, str] = {}
    serve = _Serve(home, workdir)
    pw = browser = None
    try:
        live = _run(home, workdir, n, n, "live")
        if not _running(serve, live, n):
            raise RuntimeError(f"{n} shards not running")
        # idle first: no client connected, the run live
        time.sleep(3)  # allowed-sleep: let serve settle before measuring idle
        c0, t0 = cpu_ns(serve.proc.pid), time.monotonic()
        window = 5.0 if cfg.quick else 20.0
        time.sleep(window)  # allowed-sleep: the idle measurement window
        c1, t1 = cpu_ns(serve.proc.pid), time.monotonic()
        if c0 is not None and c1 is not None:
            fig["idle_cpu"] = [100.0 * (c1 - c0) / 1e9 / (t1 - t0)]
        rss = rss_mib(serve.proc.pid)
        if rss is not None:
            fig["rss"] = [rss]
        serve.timed_get(f"/api/v1/runs/{live}")  # warm
        c0 = cpu_ns(serve.proc.pid)
        fig["run_json"] = [serve.timed_get(f"/api/v1/runs/{live}") * 1000 for _ in range(rounds)]
        c1 = cpu_ns(serve.proc.pid)
        if c0 is not None and c1 is not None:  # what the machine's load cannot inflate
            fig["run_json_cpu"] = [(c1 - c0) / 1e6 / rounds]
        fig["runs_list"] = [serve.timed_get("/api/v1/runs") * 1000 for _ in range(rounds)]
        try:
            pw, browser = _browser()
        except Skip as exc:
            text["render"] = text["change"] = text["render_big"] = str(exc)
        if browser is not None:
            _render_s(browser, serve, live, n)  # warm
            fig["render"] = [_render_s(browser, serve, live, n) * 1000 for _ in range(rounds)]
            shards = [str(i) for i in range(5)]
            fig["change"] = [x * 1000 for x in _change_latency_s(browser, serve, live, shards)]
        _stop(home, live)
        metrics_runs = [_run(home, workdir, n, 10, f"m{i}") for i in range(runs_for_metrics)]
        for r in metrics_runs:
            _running(serve, r, 10)
        serve.timed_get("/metrics")
        c0 = cpu_ns(serve.proc.pid)
        fig["metrics"] = [serve.timed_get("/metrics") * 1000 for _ in range(rounds)]
        c1 = cpu_ns(serve.proc.pid)
        if c0 is not None and c1 is not None:
            fig["metrics_cpu"] = [(c1 - c0) / 1e6 / rounds]
        for r in metrics_runs:
            _stop(home, r)
        if browser is not None:
            large = _run(home, workdir, big, 20, "big")
            _running(serve, large, 20)
            _render_s(browser, serve, large, big)  # warm
            fig["render_big"] = [
                _render_s(browser, serve, large, big) * 1000 for _ in range(rounds)
            ]
            fig["big_json"] = [
                serve.timed_get(f"/api/v1/runs/{large}") * 1000 for _ in range(rounds)
            ]
            _stop(home, large)
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        serve.close()
    log(cfg, "web: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in fig.items()))
    try:
        peers = _peer_figures(cfg, n, rounds)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is shown as such
        peers = {"page": f"error: {exc!s:.80}", "ctl": f"error: {exc!s:.80}"}
    log(cfg, f"web: supervisor {peers}")

    def c(key: str) -> Any:
        if key in fig:
            return cell(fig[key])
        return cell(text=text.get(key, "n/a"))

    def p(key: str) -> dict[str, Any]:
        if key in peers:
            return {
                "supervisor": cell(peers[key])
                if isinstance(peers[key], list)
                else cell(text=str(peers[key]))
            }
        return {}

    return [
        Row(
            key="web_render",
            family="web",
            unit="ms",
            better="lower",
            target=1000,
            metric=f"Web: dashboard first render, live {n:,}-shard run",
            orch=c("render"),
            peers=p("page"),
            note="supervisor: its web page with the same programs",
        ),
        Row(
            key="web_change",
            family="web",
            unit="ms",
            better="lower",
            target=1000,
            metric="Web: a state change visible in the page",
            orch=c("change"),
        ),
        Row(
            key="web_render_big",
            family="web",
            unit="ms",
            better="lower",
            target=2000,
            metric=f"Web: run page of a {big:,}-shard run",
            orch=c("render_big"),
        ),
        Row(
            key="web_run_json",
            family="web",
            unit="ms",
            better="lower",
            target=50,
            metric=f"Web: GET /api/v1/runs/RUN, {n:,} live shards",
            orch=c("run_json"),
            peers=p("ctl"),
            note="supervisor: supervisorctl status",
        ),
        Row(
            key="web_run_json_cpu",
            family="web",
            unit="ms CPU",
            better="lower",
            target=50,
            metric=f"Web: serve CPU per GET /api/v1/runs/RUN, {n:,} live shards",
            orch=c("run_json_cpu"),
            note="serve's own CPU time per request: what the machine's load cannot inflate",
        ),
        Row(
            key="web_metrics_cpu",
            family="web",
            unit="ms CPU",
            better="lower",
            target=100,
            metric=f"Web: serve CPU per /metrics, {runs_for_metrics} live runs of {n:,} shards",
            orch=c("metrics_cpu"),
        ),
        Row(
            key="web_metrics",
            family="web",
            unit="ms",
            better="lower",
            target=100,
            metric=f"Web: /metrics, {runs_for_metrics} live runs of {n:,} shards",
            orch=c("metrics"),
        ),
        Row(
            key="web_idle_cpu",
            family="web",
            unit="% core",
            better="lower",
            target=0.5,
            metric=f"Web: serve idle CPU, live {n:,}-shard run",
            orch=c("idle_cpu"),
        ),
        Row(
            key="web_rss",
            family="web",
            unit="MiB",
            better="lower",
            target=80,
            metric=f"Web: serve RSS, live {n:,}-shard run",
            orch=c("rss"),
        ),
    ]


def _peer_figures(cfg: Config, n: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    workdir = cfg.sub("web-sup")
    try:
        proc, url, ctl = _supervisor(workdir, n)
    except Skip as exc:
        return {"page": str(exc), "ctl": str(exc)}
    try:
        if not _wait(lambda: _supervisor_running(ctl, n), 600, 2.0):
            return {"page": "error: not running", "ctl": "error: not running"}
        samples = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            run_cmd(ctl, 300, env=base_env())
            samples.append((time.perf_counter() - t0) * 1000)
        out["ctl"] = samples[1:]
        try:
            pw, browser = _browser()
        except Skip as exc:
            out["page"] = str(exc)
            return out
        try:
            page_samples = []
            for _ in range(rounds + 1):
                ctx = browser.new_context()
                page = ctx.new_page()
                t0 = time.perf_counter()
                page.goto(url, wait_until="load", timeout=60_000)
                page_samples.append((time.perf_counter() - t0) * 1000)
                ctx.close()
            out["page"] = page_samples[1:]
        finally:
            browser.close()
            pw.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.m_web")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    become_subreaper()
    workdir = tempfile.mkdtemp(prefix="ow-", dir="/tmp")
    cfg = Config(quick=args.quick, repeat=1 if args.quick else 3, workdir=workdir, verbose=True)
    try:
        rows = web(cfg)
    finally:
        kill_everything()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for r in rows:
        o = f"{r.orch.median:,.1f}" if r.orch.ok else (r.orch.text or "n/a")
        line = f"{r.metric:<55} {o:>10} {r.unit:<7} target {r.target:g}"
        met = r.met()
        line += "  ok" if met else ("  MISSED" if met is False else "")
        for name, pc in r.peers.items():
            pv = f"{pc.median:,.1f}" if pc.ok else (pc.text or "n/a")
            line += f" | {name} {pv}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
