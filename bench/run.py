"""``python -m bench``: run every benchmark, print one table, write JSON and docs.

    python -m bench                  # full run (3 rounds), writes docs/performance.md
    python -m bench --quick          # smoke run, small N and short windows (~3 min)
    python -m bench --only respawn   # one metric family (names: --list)
    python -m bench --repeat 5
    python -m bench --render bench/results/latest.json   # rewrite the docs, run nothing

Peers come from bench/install_peers.sh; a missing one is shown as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

from bench import report
from bench.common import REPO, Config, Row, become_subreaper, kill_everything, warm_bytecode
from bench.peers import versions

#: family -> (module, function); the order is the table's.
FAMILIES = {
    "startup": ("bench.m_startup", "startup"),
    "respawn": ("bench.m_restart", "respawn"),
    "idle": ("bench.m_idle", "idle"),
    "crash": ("bench.m_restart", "crash_loop"),
    "finish": ("bench.m_restart", "clean_finish"),
    "hang": ("bench.m_restart", "hang"),
    "progress": ("bench.m_progress", "progress"),
    "logs": ("bench.m_logs", "logs"),
    "items": ("bench.m_items", "items"),
    "shardlist": ("bench.m_startup", "shardlist"),
    "status": ("bench.m_status", "status"),
    "recovery": ("bench.m_recovery", "recovery"),
    "scale": ("bench.m_scale", "scale"),
    "web": ("bench.m_web", "web"),
    "ray": ("bench.m_ray", "ray"),
}
RESULTS = REPO / "bench" / "results" / "latest.json"
DOC = REPO / "docs" / "performance.md"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N, short windows, 1 round")
    ap.add_argument("--repeat", type=int, metavar="N", help="rounds per figure (default 3; "
                    "1 with --quick)")
    ap.add_argument("--only", action="append", metavar="NAME", choices=list(FAMILIES),
                    help="run only this metric family (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the metric families")
    ap.add_argument("--json", metavar="FILE", default=str(RESULTS), help="where to write JSON")
    ap.add_argument("--docs", choices=["auto", "yes", "no"], default="auto",
                    help="write docs/performance.md (auto: only for a full run of everything)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--render", metavar="JSON", action="append",
                    help="run nothing: print the table of a JSON file written earlier and "
                    "rewrite docs/performance.md from it; given again, a later file's rows "
                    "replace the earlier ones with the same key (a partial re-run)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        print("\n".join(FAMILIES))
        return 0
    if args.render:
        rows, meta = report.from_json(args.render[0])
        for path in args.render[1:]:
            more, more_meta = report.from_json(path)
            keys = {r.key for r in more}
            rows = [next(m for m in more if m.key == r.key) if r.key in keys else r
                    for r in rows] + [m for m in more if m.key not in {r.key for r in rows}]
            meta.setdefault("reruns", []).append(
                {"families": more_meta["families"], "date": more_meta["machine"]["date"],
                 "command": more_meta["command"], "load": more_meta["machine"].get("load"),
                 "elapsed_s": more_meta.get("elapsed_s")})
            meta["elapsed_s"] = meta.get("elapsed_s", 0.0) + (more_meta.get("elapsed_s") or 0.0)
        print(report.render_text(rows))
        report.write_markdown(str(DOC), rows, meta)
        print(f"docs: {os.path.relpath(DOC)}")
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    families = args.only or list(FAMILIES)
    become_subreaper()
    warm_bytecode()
    workdir = tempfile.mkdtemp(prefix="ob-", dir="/tmp")  # short: ipc paths must fit
    cfg = Config(quick=args.quick, repeat=repeat, workdir=workdir)
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        for name in families:
            mod, fn = FAMILIES[name]
            report.progress(f"== {name}")
            started = time.monotonic()
            try:
                rows += getattr(importlib.import_module(mod), fn)(cfg)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one family failing still prints the rest
                report.progress(f"   {name} failed: {exc!r}")
            finally:
                kill_everything()
            report.progress(f"   {name}: {time.monotonic() - started:.0f} s")
    finally:
        kill_everything()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    cmd = "python -m bench" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:]
                               else "")
    meta = {"machine": report.machine(), "versions": versions(), "repeat": repeat,
            "quick": args.quick, "families": families, "elapsed_s": time.monotonic() - t0,
            "command": cmd}
    print(report.render_text(rows))
    report.write_json(args.json, rows, meta)
    print(f"\nJSON: {os.path.relpath(args.json)}")
    full = not args.quick and args.only is None
    if args.docs == "yes" or (args.docs == "auto" and full):
        report.write_markdown(str(DOC), rows, meta)
        print(f"docs: {os.path.relpath(DOC)}")
    return 0
