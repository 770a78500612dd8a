"""Where the Ray backend places an attempt: a pure function of nodes, use and demand.

orch places attempts itself (one host actor per node runs them, see
``orchestrator.backends.ray``): each node's totals come from the cluster
(``CPU``, ``memory`` in bytes, custom resources), and what this run's live
attempts take of them is counted here. An attempt goes to the node that
fits it with the most free share left (spread); a tie goes to the node with
fewer of this run's attempts, then to the lower node id. No Ray import:
tested in tests/unit/test_placement.py.

The accounting covers this run only: other runs and other Ray work on the
same nodes are not seen (docs/scale-out.md, "A real cluster").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Rounding slack when comparing fractional resources (0.1 + 0.2 > 0.3).
EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Node:
    """An alive node and its resource totals (``CPU``, ``memory``, custom names)."""

    id: str
    total: Mapping[str, float]


@dataclass(slots=True)
class Use:
    """What this run's live attempts take of one node."""

    taken: dict[str, float] = field(default_factory=dict)
    attempts: int = 0

    def add(self, demand: Mapping[str, float]) -> None:
        for key, value in demand.items():
            self.taken[key] = self.taken.get(key, 0.0) + value
        self.attempts += 1

    def remove(self, demand: Mapping[str, float]) -> None:
        for key, value in demand.items():
            self.taken[key] = max(0.0, self.taken.get(key, 0.0) - value)
        self.attempts = max(0, self.attempts - 1)


def demand_of(
    num_cpus: float, memory_bytes: int | None, resources: Mapping[str, float] | None
) -> dict[str, float]:
    """One attempt's demand: ``--shard-cpus``, ``--shard-memory``, ``resources = {...}``."""
    out: dict[str, float] = {}
    if num_cpus:
        out["CPU"] = float(num_cpus)
    if memory_bytes:
        out["memory"] = float(memory_bytes)
    for key, value in (resources or {}).items():
        if value:
            out[key] = out.get(key, 0.0) + float(value)
    return out


def fits(
    total: Mapping[str, float], taken: Mapping[str, float], demand: Mapping[str, float]
) -> bool:
    return all(total.get(k, 0.0) - taken.get(k, 0.0) + EPS >= v for k, v in demand.items())


def choose(
    nodes: Iterable[Node], use: Mapping[str, Use], demand: Mapping[str, float]
) -> str | None:
    """The node for one more attempt with ``demand``, or None when no node fits it now."""
    best: tuple[float, int, str] | None = None
    empty = Use()
    for node in nodes:
        u = use.get(node.id, empty)
        if not fits(node.total, u.taken, demand):
            continue
        keys = set(demand) | {"CPU"}
        shares = [
            (node.total[k] - u.taken.get(k, 0.0) - demand.get(k, 0.0)) / node.total[k]
            for k in keys
            if node.total.get(k, 0.0) > 0
        ]
        share = min(shares) if shares else 0.0
        rank = (-share, u.attempts, node.id)
        if best is None or rank < best:
            best = rank
    return best[2] if best is not None else None


def ever_fits(nodes: Iterable[Node], demand: Mapping[str, float]) -> bool:
    """Could some node run one attempt when this run uses nothing on it?"""
    return any(fits(node.total, {}, demand) for node in nodes)


def describe(demand: Mapping[str, float]) -> str:
    """``CPU 1, memory 2.0 GiB, nodeA 1`` (for one-line messages)."""
    parts = []
    for key, value in sorted(demand.items(), key=lambda kv: (kv[0] != "CPU", kv[0])):
        if key == "memory":
            parts.append(f"memory {value / 2**30:.1f} GiB")
        else:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts) or "nothing"
