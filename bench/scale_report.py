"""The cost-curve section of docs/performance.md: per-metric tables, fitted growth, log-log PNGs.

Made from the scale rows of a run (bench/m_scale.py), so ``--render`` redraws
the plots from a JSON file without running anything.
"""

from __future__ import annotations

import os

from bench.common import REPO, Cell, Row
from bench.m_scale import METRICS, Curve, curves, describe, growth

IMG = REPO / "docs" / "img"
ORDER = ("orch", "supervisor", "circus", "pm2", "parallel", "posix_spawn loop")

#: plot file -> (title, y label, [(metric, contender or None for all, legend suffix)])
PLOTS: dict[str, tuple[str, str, list[tuple[str, str | None, str]]]] = {
    "scale-time.png": ("Time to all running, recovery", "seconds", [
        ("up", None, ""), ("resume", "orch", " resume"), ("kill", "orch", " SIGKILL→gone")]),
    "scale-status.png": ("Status command latency", "milliseconds", [
        ("status", None, ""), ("status_json", "orch", " --json")]),
    "scale-cpu.png": ("Manager CPU", "% of a core", [
        ("idle_cpu", None, " idle"), ("hb_cpu", "orch", " heartbeats 1/s each")]),
    "scale-memory.png": ("Manager memory", "MiB (RSS)", [
        ("rss", None, ""), ("guardian_rss", "orch", " guardian")]),
}


COLORS = {"orch": "C0", "supervisor": "C1", "circus": "C2", "pm2": "C3", "parallel": "C4",
          "posix_spawn loop": "C7"}
STYLES = ("-", ":", "-.")
MARKERS = "o^s"
FLOOR = 1e-3


def _fmt(c: Cell) -> str:
    from bench.report import fmt

    return fmt(c)


def plot(cur: dict[str, Curve], directory: str = str(IMG)) -> list[str]:
    """Write the log-log PNGs; return their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, (title, ylabel, series) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        k = 0
        floored = False
        for i, (metric, who, suffix) in enumerate(series):
            for contender in ORDER:
                if who is not None and contender != who:
                    continue
                pts = sorted(cur.get(metric, {}).get(contender, []), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                # The minimum of the rounds (the least disturbed figure on a shared machine,
                # as in the growth fit), a bar up to the maximum. Log axes cannot show 0
                # (an idle manager that used no CPU in the window): drawn at FLOOR.
                ys = [max(min(c.samples), FLOOR) for _, c in pts]
                floored = floored or any(min(c.samples) <= 0 for _, c in pts)
                lo = [0.0 for _ in pts]
                hi = [max(0.0, max(max(c.samples), FLOOR) - y)
                      for y, (_, c) in zip(ys, pts, strict=True)]
                style = "--" if contender == "posix_spawn loop" else STYLES[i % len(STYLES)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, marker=MARKERS[i % len(MARKERS)],
                            color=COLORS.get(contender, "C9"), capsize=2,
                            label=contender + suffix,
                            linewidth=2.4 if contender == "orch" else 1.2)
                k += 1
        if floored:
            ax.text(0.01, 0.01, f"0 is drawn at {FLOOR:g}", transform=ax.transAxes, fontsize=7)
        if k == 0:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (concurrent children)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (minimum of rounds, bar to maximum)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name))
        plt.close(fig)
        written.append(name)
    return written


def section(rows: list[Row]) -> list[str]:
    """Markdown lines for the cost curve (empty when the run has no scale rows)."""
    scale = [r for r in rows if r.family == "scale"]
    if not scale:
        return []
    cur = curves(scale)
    images = plot(cur)
    ceiling_note = next((r.note for r in scale if r.note.startswith("ceiling")), "")
    out = ["## Cost curve", "",
           "`python -m bench --only scale`: N concurrent `sleep` children, one detached run "
           "per N (bench/m_scale.py says what each figure is). Cells: median (min–max); "
           "the plots show the minimum of the rounds with a bar to the maximum. "
           "Growth is fitted over N ≥ 100 on the minimum of each N (the least disturbed "
           "figure on a shared machine): the log–log slope (1 = linear) and the cost of "
           "one more shard (least squares)."]
    if ceiling_note:
        why = ceiling_note.split(";")[0].removeprefix("ceiling: ")
        out += ["", f"Ceiling on this machine: {why}."]
    out.append("")
    placed = {metric: name for name, (_, _, series) in PLOTS.items() if name in images
              for metric in [series[0][0]]}
    for metric, (what, unit) in METRICS.items():
        per_n = cur.get(metric)
        if not per_n:
            continue
        if metric in placed:  # each plot above the table of its first series
            out += [f"![{placed[metric]}](img/{placed[metric]})", ""]
        names = [n for n in ORDER if n in per_n]
        texts: dict[tuple[int, str], str] = {}
        sizes: set[int] = set()
        for r in scale:
            if r.key.startswith(f"scale:{metric}:"):
                n = int(r.key.split(":", 2)[2].removeprefix("N=").replace(",", ""))
                sizes.add(n)
                for name, c in {"orch": r.orch, **r.peers,
                                **({"posix_spawn loop": r.limit} if r.limit else {})}.items():
                    if c is not None:
                        texts[(n, name)] = _fmt(c)
                        if name not in names and name in ORDER:
                            names.append(name)
        names = [n for n in ORDER if n in names]
        out += [f"### {what[0].upper() + what[1:]} ({unit})", "",
                "| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for n in sorted(sizes):
            out.append(f"| {n:,} | " + " | ".join(texts.get((n, c), "") for c in names) + " |")
        fits = []
        if metric == "rss":
            fits.append("the cost per shard is the RSS per shard")
        for name in names:
            g = growth(per_n.get(name, []))
            if g is not None:
                fits.append(f"{name}: {describe(metric, unit, g)}")
        if fits:
            out += ["", "Growth (" + fits[0] + "): " + "; ".join(fits[1:]) + "."
                    if metric == "rss" else "Growth: " + "; ".join(fits) + "."]
        out.append("")
    big = [r for r in scale if r.key.startswith("scalebig:")]
    if big:
        from bench.report import fmt

        out += ["### More shards than slots", "", "| metric | unit | orch |", "|---|---|---|"]
        out += [f"| {r.metric} | {r.unit} | {fmt(r.orch)} |" for r in big]
        out.append("")
    return out
