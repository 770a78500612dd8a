"""The one table: printed, written as JSON, and as docs/performance.md."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import orjson

from bench.common import REPO, Cell, Row

COLUMNS = ("supervisor", "circus", "pm2", "parallel", "tqdm")
FINDINGS = REPO / "bench" / "FINDINGS.md"


def num(x: float) -> str:
    a = abs(x)
    if a >= 1 and float(x).is_integer():
        return f"{x:,.0f}"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a >= 0.01:
        return f"{x:.3f}"
    if a == 0:
        return "0"
    return f"{x:.2g}"


def fmt(c: Cell | None, ranges: bool = True) -> str:
    if c is None:
        return ""
    if not c.ok:
        return c.text or "n/a"
    m = num(c.median)
    lo, hi = min(c.samples), max(c.samples)
    if ranges and len(c.samples) > 1 and lo != hi:
        return f"{m} ({num(lo)}–{num(hi)})"
    return m


def ratio(x: float | None) -> str:
    if x is None:
        return ""
    if x == float("inf"):
        return "∞"
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x"


def table_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in COLUMNS if any(c in r.peers for r in rows)]
    head = ["metric", "unit", "orch", *cols, "vs best peer", "limit", "x limit", "target", "met"]
    body = []
    for r in rows:
        best = r.best_peer()
        adv = r.advantage(best[1]) if best else None
        x_lim = r.x_limit()
        met = r.met()
        cmp = "≤" if r.better == "lower" else "≥"
        goals = ([f"{cmp} {num(r.target)}"] if r.target is not None else []) + (
            [f"≤ {r.target_x_limit:g}x limit"] if r.target_x_limit is not None else [])
        body.append([
            r.metric, r.unit, fmt(r.orch), *[fmt(r.peers.get(c)) for c in cols],
            (f"{ratio(adv)} ({best[0]})" if adv is not None and best else ""),
            (f"{fmt(r.limit, False)} ({r.limit_label})" if r.limit is not None else ""),
            ratio(x_lim),
            ", ".join(goals),
            "" if met is None else ("met" if met else "MISSED"),
        ])
    return head, body


def render_text(rows: list[Row]) -> str:
    head, body = table_rows(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[0] = min(widths[0], 58)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)))
    notes = [f"  [{r.key}] {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "load": [round(x, 2) for x in os.getloadavg()],
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30)}


def to_json(rows: list[Row], meta: dict[str, Any]) -> bytes:
    data = {"meta": meta, "rows": [{
        "key": r.key, "family": r.family, "metric": r.metric, "unit": r.unit,
        "better": r.better, "orch": r.orch.to_json(),
        "peers": {n: c.to_json() for n, c in r.peers.items()},
        "limit": r.limit.to_json() if r.limit else None, "limit_label": r.limit_label,
        "target": r.target, "target_x_limit": r.target_x_limit, "met": r.met(),
        "note": r.note,
        "advantage_vs_best_peer": (r.advantage(r.best_peer()[1])  # type: ignore[index]
                                   if r.best_peer() else None),
    } for r in rows]}
    return orjson.dumps(data, option=orjson.OPT_INDENT_2)


def _cell(d: dict[str, Any] | None) -> Cell | None:
    if d is None:
        return None
    return Cell(samples=list(d.get("samples") or []), text=d.get("text"), note=d.get("note", ""))


def from_json(path: str) -> tuple[list[Row], dict[str, Any]]:
    """Rows and meta back from a JSON file this module wrote (to re-render the docs)."""
    with open(path, "rb") as f:
        data = orjson.loads(f.read())
    rows = [Row(key=r["key"], family=r["family"], metric=r["metric"], unit=r["unit"],
                better=r["better"], orch=_cell(r["orch"]) or Cell(),
                peers={n: _cell(c) or Cell() for n, c in r["peers"].items()},
                limit=_cell(r["limit"]), limit_label=r["limit_label"], target=r["target"],
                target_x_limit=r.get("target_x_limit"), note=r["note"]) for r in data["rows"]]
    return rows, data["meta"]


def write_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(to_json(rows, meta))


METHOD = """\
## How it is measured

- `python -m bench` runs each contender in turn, alternating (the order
  rotates every round), `--repeat` rounds (3 by default); a cell shows the
  median and, in brackets, min–max. Window metrics (idle, crash loop, clean
  finish) run one window per manager and show the spread of its
  sub-windows instead.
- Every manager is started by the bench as it would be by a user, with its
  default settings unless the metric says otherwise, and timed from the
  moment its command is launched. Children are counted in /proc below the
  manager (zombies excluded), polled every ~2 ms (respawn: ~0.2 ms).
- CPU is the sum over the manager's threads of `/proc/PID/task/*/schedstat`
  (ns; utime+stime's 10 ms ticks are too coarse for 0.05% of a core over
  30 s). RSS is `VmRSS`; orch's master and its guardian are separate rows.
- "vs best peer": how many times better orch is than the best installed peer
  (above 1: orch is ahead). "x limit": orch's cost as a multiple of the
  machine's limit row (1 = at the limit; the issues ask for within 2x).
- A peer that is not installed shows "skipped (not installed)"; a peer that
  has no such feature shows "n/a (...)"; no figure is ever made up.
- Peers are installed by `bench/install_peers.sh` into a separate
  environment (/tmp/bench-peers).
- orch is measured as a user installs it (`pip install .`, not editable):
  an editable install's finder adds ~15 ms of `site` to every Python start,
  orch's and the bare loop's alike, which flatters orch's start-up ratios.
"""


def render_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    from bench import scale_report

    curve = scale_report.section(rows)
    rows = [r for r in rows if r.family != "scale"]  # the cost curve has its own section
    head, body = table_rows(rows)
    m = meta["machine"]
    out = [
        "# Performance", "",
        "Generated by `" + meta["command"] + "` on " + m["date"] + ". Do not edit the table "
        "by hand; rerun the command (findings come from bench/FINDINGS.md).", "",
        f"- Machine: {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}", f"- Python {m['python']}",
        *([f"- Load average at the end (1, 5, 15 min): {m['load']}"]
          if "load" in m else []),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Rounds: {meta['repeat']}; total bench time {meta['elapsed_s']:.0f} s"
        + (" (every file below included)" if meta.get("reruns") else ""),
        *[f"- Rows of {', '.join(r['families'])}: measured on {r['date']} with `{r['command']}`"
          + (f" (load at the end {r['load']}, {r['elapsed_s']:.0f} s)"
             if r.get("load") and r.get("elapsed_s") is not None else "")
          for r in meta.get("reruns", [])], "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for b in body:
        out.append("| " + " | ".join(x.replace("|", "/") for x in b) + " |")
    notes = [f"- **{r.key}**: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "Notes:", "", *notes]
    out += ["", *curve, METHOD]
    if FINDINGS.exists():
        out += ["## Findings", "", FINDINGS.read_text().strip(), ""]
    return "\n".join(out)


def write_markdown(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(render_markdown(rows, meta))


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
