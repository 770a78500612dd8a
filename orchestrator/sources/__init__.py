"""Shard lists: reading CSV, JSON lines, text, ``--split N`` and ``--range A..B``.

A shard list is validated completely before a run starts (DESIGN.md #8): a bad
byte, a short row, an empty or duplicate id is reported as one line naming the
file and the physical line (quoted CSV fields may span lines; the line given is
where the record starts). Nothing is half-started because of a bad row 90,000.

Memory is kept lean because a shard list of 100,000 rows is ordinary: a CSV
is kept as its text with a few offsets per row (a record is parsed when asked
for, an id is a slice of the text), ids are found through an open-addressing
table of indexes (``model.IdIndex``), ``--split``/``--range`` are virtual, and
``Shard`` objects are built only when asked for.
"""

from __future__ import annotations

from orchestrator.errors import ShardListError
from orchestrator.sources.files import load_file
from orchestrator.sources.model import Shard, ShardList
from orchestrator.sources.virtual import MAX_VIRTUAL_SHARDS, parse_range, range_list, split_list

__all__ = ["MAX_VIRTUAL_SHARDS", "Shard", "ShardList", "load_shards", "parse_range"]


def load_shards(
    path: str | None = None,
    *,
    split: int | None = None,
    range_: str | None = None,
    fmt: str | None = None,
) -> ShardList:
    """Load and validate a shard list from exactly one of a file, ``split`` or ``range_``.

    The file format is ``fmt`` (csv, tsv, jsonl, text) or follows the extension
    (.csv, .tsv, .jsonl/.ndjson, anything else is text). Every problem raises
    ``ShardListError`` with one line naming the source and line.
    """
    given = [
        name
        for name, v in (("--shards", path), ("--split", split), ("--range", range_))
        if v is not None
    ]
    if not given:
        raise ShardListError("no shard list: give --shards FILE, --split N or --range A..B")
    if len(given) > 1:
        raise ShardListError(f"give only one shard list, got {' and '.join(given)}")
    if split is not None:
        return split_list(split)
    if range_ is not None:
        return range_list(range_)
    assert path is not None
    return load_file(path, fmt)
