"""A shard and an immutable, validated list of them, built lazily from any source."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from orchestrator.errors import ShardListError


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
        "_records",
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
        records: Callable[[], Iterator[Mapping[str, Any]]] | None = None,
    ) -> None:
        """Built by the loaders (``files``, ``virtual``); callables give shard ``i``'s parts
        (``records``, when given: every record in order, faster than one by one)."""
        self.source = source
        self.path = path
        self.format = format
        self.fields = fields
        self._len = length
        self._id_at = id_at
        self._record_at = record_at
        self._line_at = line_at
        self._index_of = index_of
        self._records = records

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
        index = IdIndex(ids.__getitem__, len(ids))
        for i, shard_id in enumerate(ids):
            if not isinstance(shard_id, str) or not shard_id or "\0" in shard_id:
                raise ShardListError(f"{source}: shard {i} has an invalid id {shard_id!r}")
            if index.add(shard_id, i) != i:
                raise ShardListError(f"{source}: duplicate shard id {shard_id!r}")
        return cls(
            source=source,
            path=path,
            format=format,
            fields=common_keys(recs),
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
        if self._records is not None:
            for i, record in enumerate(self._records()):
                yield Shard(i, id_at(i), record, line_at(i))
            return
        for i in range(self._len):
            yield Shard(i, id_at(i), record_at(i), line_at(i))

    def id_at(self, i: int) -> str:
        """Shard ``i``'s id alone (no record built)."""
        return self._id_at(i)

    def index_of(self, shard_id: str) -> int | None:
        """The index of the shard with this id, or None."""
        return self._index_of(shard_id)

    def __repr__(self) -> str:
        return f"<ShardList {self.source!r} format={self.format} len={self._len}>"


class IdIndex:
    """Shard id -> index, for ids that shard ``i``'s ``id_at(i)`` gives back: an
    open-addressing table of indexes keyed by the id's hash (linear probing, at most
    half full), 4 bytes a slot where a dict costs ~100 bytes an id with its int.

    Ids are compared through ``id_at``, so the table keeps no string of its own.
    Lookups are a little slower than a dict's (a Python loop, ~1 µs): the master's
    per-heartbeat path uses its own cache of running shards (``shard.ShardRuns``).
    """

    __slots__ = ("_count", "_id_at", "_mask", "_table")

    def __init__(self, id_at: Callable[[int], str], expected: int = 0) -> None:
        self._id_at = id_at
        self._count = 0
        size = 8
        while size < 2 * expected:
            size *= 2
        self._table = array("i", [-1]) * size
        self._mask = size - 1

    def __len__(self) -> int:
        return self._count

    def add(self, shard_id: str, i: int) -> int:
        """Enter ``shard_id`` (``id_at(i)``) as shard ``i``; the index of an earlier shard
        with the same id instead (a duplicate is not entered)."""
        table, mask, id_at = self._table, self._mask, self._id_at
        h = hash(shard_id) & mask
        while True:
            j = table[h]
            if j < 0:
                break
            if id_at(j) == shard_id:
                return j
            h = (h + 1) & mask
        table[h] = i
        self._count += 1
        if 2 * self._count > mask:
            self._grow()
        return i

    def get(self, shard_id: str) -> int | None:
        """The index of the shard with this id, or None."""
        table, mask, id_at = self._table, self._mask, self._id_at
        h = hash(shard_id) & mask
        while True:
            j = table[h]
            if j < 0:
                return None
            if id_at(j) == shard_id:
                return j
            h = (h + 1) & mask

    def _grow(self) -> None:
        old, id_at = self._table, self._id_at
        size = 2 * len(old)
        table = array("i", [-1]) * size
        mask = size - 1
        for j in old:
            if j >= 0:
                h = hash(id_at(j)) & mask
                while table[h] >= 0:
                    h = (h + 1) & mask
                table[h] = j
        self._table, self._mask = table, mask


def common_keys(records: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The keys every record has (what a template may use without looking at each one)."""
    if not records:
        return frozenset()
    common = set(records[0])
    for record in records:
        if common and not common.issubset(record):
            common.intersection_update(record)
    return frozenset(common)
