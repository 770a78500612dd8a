"""Placement of Ray attempts on nodes: a pure function, tested without Ray (issue 13)."""

from __future__ import annotations

from orchestrator.backends.placement import (
    Node,
    Use,
    choose,
    demand_of,
    describe,
    ever_fits,
)

GIB = 2.0**30
A = Node("a", {"CPU": 2.0, "memory": 4 * GIB, "nodeA": 2.0})
B = Node("b", {"CPU": 4.0, "memory": 8 * GIB, "nodeB": 2.0})


def place(nodes: list[Node], demand: dict[str, float], n: int) -> list[str | None]:
    """Place ``n`` attempts one after another, counting each one's use."""
    use: dict[str, Use] = {}
    out: list[str | None] = []
    for _ in range(n):
        node = choose(nodes, use, demand)
        out.append(node)
        if node is not None:
            use.setdefault(node, Use()).add(demand)
    return out


def test_demand_of_flags_and_custom_resources() -> None:
    assert demand_of(1, None, None) == {"CPU": 1.0}
    assert demand_of(0, 2**30, {"nodeA": 1, "gpu": 0}) == {"memory": GIB, "nodeA": 1.0}
    assert describe({"CPU": 0.5, "memory": GIB, "nodeA": 1}) == "CPU 0.5, memory 1.0 GiB, nodeA 1"


def test_spreads_by_free_share_and_stops_when_full() -> None:
    got = place([A, B], {"CPU": 1.0}, 7)
    # B has twice A's CPUs: the most free share goes first, then they alternate.
    assert got[:6].count("a") == 2 and got[:6].count("b") == 4
    assert got[6] is None  # 6 CPUs in all: the seventh waits


def test_zero_demand_spreads_by_count() -> None:
    got = place([A, B], {}, 6)
    assert got.count("a") == 3 and got.count("b") == 3


def test_custom_resource_pins_to_its_node() -> None:
    assert place([A, B], {"nodeB": 0.5}, 5) == ["b", "b", "b", "b", None]


def test_memory_counts_against_the_node() -> None:
    assert place([A, B], {"memory": 3 * GIB}, 4) == ["b", "a", "b", None]


def test_freeing_makes_room_again() -> None:
    use: dict[str, Use] = {"a": Use()}
    demand = {"CPU": 2.0}
    use["a"].add(demand)
    assert choose([A], use, demand) is None
    use["a"].remove(demand)
    assert choose([A], use, demand) == "a"


def test_fractions_do_not_lose_a_slot_to_rounding() -> None:
    node = Node("n", {"CPU": 0.3})
    assert place([node], {"CPU": 0.1}, 4) == ["n", "n", "n", None]


def test_ever_fits_ignores_this_runs_use() -> None:
    assert ever_fits([A, B], {"CPU": 4.0})
    assert not ever_fits([A, B], {"CPU": 8.0})
    assert not ever_fits([A, B], {"gpu": 1.0})
    assert not ever_fits([], {})
