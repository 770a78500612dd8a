"""Virtual shard lists: ``--split N`` (0..N-1) and ``--range A..B``; nothing is stored per shard."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import ShardListError
from orchestrator.sources.model import ShardList

#: Upper bound for ``--split``/``--range`` so a typo cannot create a billion shards.
MAX_VIRTUAL_SHARDS = 10_000_000

_RANGE_RE = re.compile(r"\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*", re.ASCII)


def parse_range(text: object, *, where: str = "--range") -> tuple[int, int]:
    """Parse ``A..B`` (integers, both ends inclusive, like shell ``{1..10}``)."""
    match = _RANGE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ShardListError(f"{where}: invalid range {text!r} (use A..B, e.g. 1..10)")
    start, end = int(match.group(1)), int(match.group(2))
    for n in (start, end):  # each value is stored in the run database: 64-bit
        if not -(2**63) <= n < 2**63:
            raise ShardListError(f"{where}: {n} is out of range in {text!r} (64-bit integers)")
    if end < start:
        raise ShardListError(f"{where}: end {end} is before start {start} in {text!r}")
    if end - start + 1 > MAX_VIRTUAL_SHARDS:
        raise ShardListError(
            f"{where}: {end - start + 1} shards is more than the limit of {MAX_VIRTUAL_SHARDS}"
        )
    return start, end


def split_list(n: object) -> ShardList:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ShardListError(f"--split: must be a whole number, got {n!r}")
    if n < 1:
        raise ShardListError(f"--split: must be at least 1, got {n}")
    if n > MAX_VIRTUAL_SHARDS:
        raise ShardListError(f"--split: must be at most {MAX_VIRTUAL_SHARDS}, got {n}")
    empty: Mapping[str, Any] = {}
    return ShardList(
        source=f"--split {n}",
        path=None,
        format="split",
        fields=frozenset(),
        length=n,
        id_at=str,
        record_at=lambda i: empty,
        line_at=lambda i: 0,
        index_of=lambda s: _virtual_index(s, 0, n),
    )


def range_list(text: str) -> ShardList:
    start, end = parse_range(text)
    n = end - start + 1
    return ShardList(
        source=f"--range {start}..{end}",
        path=None,
        format="range",
        fields=frozenset({"value"}),
        length=n,
        id_at=lambda i: str(start + i),
        record_at=lambda i: {"value": start + i},
        line_at=lambda i: 0,
        index_of=lambda s: _virtual_index(s, start, n),
    )


def _virtual_index(shard_id: str, start: int, n: int) -> int | None:
    """Index of a canonical integer id ("7", "-3"; not "07", "+7", " 7" or "7_0") in
    start..start+n-1. On the heartbeat path: ``int`` and one ``str`` back, no regex."""
    if len(shard_id) > 21:
        return None
    try:
        value = int(shard_id)
    except ValueError:
        return None
    if not start <= value < start + n or str(value) != shard_id:
        return None
    return value - start
