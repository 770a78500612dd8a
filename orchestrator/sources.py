"""Shard lists: reading CSV, JSON lines, text, ``--split N`` and ``--range A..B``.

A shard list is validated completely before a run starts (DESIGN.md #8): a bad
byte, a short row, an empty or duplicate id is reported as one line naming the
file and the physical line (quoted CSV fields may span lines; the line given is
where the record starts). Nothing is half-started because of a bad row 90,000.

Memory is kept lean because a shard list of 100,000 rows is ordinary: CSV rows
are stored as tuples sharing one header, ``--split``/``--range`` are virtual,
and ``Shard`` objects are built only when asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from orchestrator.errors import ShardListError

__all__ = ["MAX_VIRTUAL_SHARDS", "Shard", "ShardList", "load_shards", "parse_range"]

#: Upper bound for ``--split``/``--range`` so a typo cannot create a billion shards.
MAX_VIRTUAL_SHARDS = 10_000_000

_FORMATS = {
    "csv": "csv",
    "tsv": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "text": "text",
    "txt": "text",
}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Repeated CSV values (a country, a status) are stored once; the cache per column is
# bounded so a column of unique values costs little more than no cache at all.
_CACHE_LIMIT = 4096
_RANGE_RE = re.compile(r"\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*", re.ASCII)


@dataclass(frozen=True, slots=True)
class Shard:
    """One piece of work: its position, its id, its record, and where it came from.

    ``line`` is the 1-based physical line of the source where the record starts,
    or 0 for ``--split``/``--range`` shards.
    """

    index: int
    id: str
    record: Mapping[str, Any]
    line: int


class ShardList(Sequence[Shard]):
    """An immutable, validated sequence of shards with unique, non-empty ids.

    ``fields`` holds the fields that every record has, so templates can be
    checked against 100,000 records without looking at each one.
    """

    __slots__ = (
        "_id_at",
        "_index_of",
        "_len",
        "_line_at",
        "_record_at",
        "fields",
        "format",
        "path",
        "source",
    )

    def __init__(
        self,
        *,
        source: str,
        path: str | None,
        format: str,
        fields: frozenset[str],
        length: int,
        id_at: Callable[[int], str],
        record_at: Callable[[int], Mapping[str, Any]],
        line_at: Callable[[int], int],
        index_of: Callable[[str], int | None],
    ) -> None:
        """Built by the loaders below; the callables give shard ``i``'s parts on demand."""
        self.source = source
        self.path = path
        self.format = format
        self.fields = fields
        self._len = length
        self._id_at = id_at
        self._record_at = record_at
        self._line_at = line_at
        self._index_of = index_of

    @classmethod
    def from_records(
        cls,
        records: Sequence[tuple[str, Mapping[str, Any], int]],
        *,
        source: str,
        format: str,
        path: str | None = None,
    ) -> ShardList:
        """Rebuild a list from stored ``(id, record, line)`` rows, e.g. on resume."""
        ids = [row[0] for row in records]
        recs = [row[1] for row in records]
        lines = [row[2] for row in records]
        index: dict[str, int] = {}
        for i, shard_id in enumerate(ids):
            if not isinstance(shard_id, str) or not shard_id or "\0" in shard_id:
                raise ShardListError(f"{source}: shard {i} has an invalid id {shard_id!r}")
            if index.setdefault(shard_id, i) != i:
                raise ShardListError(f"{source}: duplicate shard id {shard_id!r}")
        return cls(
            source=source,
            path=path,
            format=format,
            fields=_common_keys(recs),
            length=len(ids),
            id_at=ids.__getitem__,
            record_at=recs.__getitem__,
            line_at=lines.__getitem__,
            index_of=index.get,
        )

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Shard: ...

    @overload
    def __getitem__(self, i: slice) -> list[Shard]: ...

    def __getitem__(self, i: int | slice) -> Shard | list[Shard]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"shard index {i} out of range")
        return Shard(i, self._id_at(i), self._record_at(i), self._line_at(i))

    def __iter__(self) -> Iterator[Shard]:
        id_at, record_at, line_at = self._id_at, self._record_at, self._line_at
        for i in range(self._len):
            yield Shard(i, id_at(i), record_at(i), line_at(i))

    def index_of(self, shard_id: str) -> int | None:
        """The index of the shard with this id, or None."""
        return self._index_of(shard_id)

    def __repr__(self) -> str:
        return f"<ShardList {self.source!r} format={self.format} len={self._len}>"


def _common_keys(records: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    if not records:
        return frozenset()
    common = set(records[0])
    for record in records:
        if common and not common.issubset(record):
            common.intersection_update(record)
    return frozenset(common)


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
        return _split(split)
    if range_ is not None:
        return _range(range_)
    assert path is not None
    from orchestrator.readers import load_file  # the file readers build ShardLists

    return load_file(path, fmt)


def _split(n: object) -> ShardList:
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


def _range(text: str) -> ShardList:
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
    """Index of a canonical integer id ("7", "-3"; not "07" or "+7") in start..start+n-1."""
    if not re.fullmatch(r"-?\d{1,20}", shard_id, re.ASCII):
        return None
    value = int(shard_id)
    if str(value) != shard_id or not start <= value < start + n:
        return None
    return value - start
