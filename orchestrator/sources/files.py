"""Reading shard list files: CSV/TSV (header row), JSON lines, plain text.

Each reader validates the whole file before anything starts: the encoding
(with the line and column of a bad byte), the CSV header and row widths,
JSON syntax and types, empty and duplicate ids (naming both lines). Errors
are one-line ``ShardListError``s naming the file and the physical line.
"""

from __future__ import annotations

import csv
import os
from array import array
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from orchestrator.errors import ShardListError
from orchestrator.sources.model import IdIndex, ShardList, common_keys

_FORMATS = {
    "csv": "csv",
    "tsv": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "text": "text",
    "txt": "text",
}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: Offsets and line numbers of a text under 2 GiB: 4 bytes each.
_OFFSET = "i"


def load_file(path: str, fmt: str | None) -> ShardList:
    src = path
    if fmt is not None:
        kind = _FORMATS.get(fmt.lower())
        if kind is None:
            raise ShardListError(f"--format: unknown format {fmt!r} (use csv, tsv, jsonl or text)")
    else:
        kind = _EXTENSIONS.get(os.path.splitext(path)[1].lower(), "text")
    text = _read_text(path)
    abspath = os.path.abspath(path)
    if kind in ("csv", "tsv"):
        return _load_csv(text, src, abspath, "\t" if kind == "tsv" else ",")
    if kind == "jsonl":
        return _load_jsonl(text, src, abspath)
    return _load_text(text, src, abspath)


def _read_text(path: str) -> str:
    """Read the file as UTF-8 (BOM dropped); name the line and column of a bad byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ShardListError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ShardListError(f"{path}: is a directory, not a shard list file") from None
    except PermissionError:
        raise ShardListError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ShardListError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ShardListError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None
    return text.removeprefix("\ufeff")


def _physical_lines(text: str, start: int = 0) -> Iterator[str]:
    """Lines split on "\\n" only (keeping it), unlike str.splitlines which also splits
    on form feeds and U+2028 that may legally sit inside a CSV or JSON value; from
    offset ``start``."""
    n, find = len(text), text.find
    while start < n:
        end = find("\n", start)
        if end == -1:
            yield text[start:]
            return
        yield text[start : end + 1]
        start = end + 1


class _Cursor:
    """Physical lines of ``text`` for ``csv.reader``, counting the characters handed out
    (csv.reader reads no further than the record it returns)."""

    __slots__ = ("lines", "pos")

    def __init__(self, text: str) -> None:
        self.pos = 0
        self.lines = self._lines(text)

    def _lines(self, text: str) -> Iterator[str]:
        for line in _physical_lines(text):
            self.pos += len(line)
            yield line


def _load_csv(text: str, src: str, abspath: str, delimiter: str) -> ShardList:
    """Validate every row now; keep the text and where each record and its id sit in it,
    the record parsed on demand.

    100,000 rows then cost their text and 16 bytes each (three offsets and a line
    number) plus about 10 of id index, not a tuple of strings per row nor a string
    and a dict entry per id (records are read once per attempt, at spawn; an id is
    a slice of the text).
    """
    cursor = _Cursor(text)
    reader = csv.reader(cursor.lines, delimiter=delimiter, strict=True)
    header: tuple[str, ...] | None = None
    code = _OFFSET if len(text) < 2**31 else "q"
    starts = array(code)  # where each record starts
    lines = array(code)  # the physical line it starts on
    # Where its id sits in the text: [id_from, id_to), or for an id that is not the text
    # itself (a quoted field) id_to -1 and id_from its place in ``quoted``.
    id_from = array(code)
    id_to = array(code)
    quoted: list[str] = []
    find = text.find

    def id_at(i: int) -> str:
        end = id_to[i]
        return text[id_from[i] : end] if end >= 0 else quoted[id_from[i]]

    index = IdIndex(id_at, text.count("\n") + 1)
    id_col, prev = 0, 0
    while True:
        start = prev + 1
        begin = cursor.pos
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise ShardListError(f"{src}:{start}: malformed CSV ({exc})") from None
        prev = reader.line_num
        if row is None:
            break
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = tuple(row)
            id_col = _check_header(header, src, start)
            continue
        if len(row) != len(header):
            raise ShardListError(
                f"{src}:{start}: row has {len(row)} field{'s' if len(row) != 1 else ''}, "
                f"header has {len(header)}"
            )
        shard_id = row[id_col]
        if not shard_id.strip():
            raise ShardListError(f"{src}:{start}: empty shard id in column {header[id_col]!r}")
        at = begin
        if id_col:
            at += sum(map(len, row[:id_col])) + id_col  # the fields before it and their commas
        if find('"', begin, cursor.pos) < 0 and text.startswith(shard_id, at):
            id_from.append(at)  # no quote in the record: every field is its text
            id_to.append(at + len(shard_id))
        else:
            id_from.append(len(quoted))
            id_to.append(-1)
            quoted.append(shard_id)
        _add_id(index, lines, shard_id, start, src)
        starts.append(begin)
    if header is None:
        raise ShardListError(f"{src}: no header row (the file is empty)")
    if not starts:
        raise ShardListError(f"{src}: no shards (header but no rows)")
    names = header
    last = len(starts) - 1
    starts.append(len(text))  # a record ends where the next one starts (blank lines between)

    def record_at(i: int) -> dict[str, str]:
        if not 0 <= i <= last:
            raise IndexError(f"shard index {i} out of range")
        chunk = text[starts[i] : starts[i + 1]]
        row = next(csv.reader(_physical_lines(chunk), delimiter=delimiter, strict=True))
        return dict(zip(names, row, strict=True))

    def records() -> Iterator[dict[str, str]]:
        """Every record in order, read by one reader (what creating the run stores)."""
        rows = csv.reader(_physical_lines(text, starts[0]), delimiter=delimiter, strict=True)
        for row in rows:
            if row and (len(row) > 1 or row[0].strip()):
                yield dict(zip(names, row, strict=True))

    return ShardList(
        source=src,
        path=abspath,
        format="csv",
        fields=frozenset(names),
        length=last + 1,
        id_at=id_at,
        record_at=record_at,
        line_at=lines.__getitem__,
        index_of=index.get,
        records=records,
    )


def _add_id(index: IdIndex, lines: array[int], shard_id: str, line: int, src: str) -> None:
    """Record a new shard's id and line; a duplicate names both lines."""
    if "\0" in shard_id:  # the id travels in ORCH_SHARD_ID: no environment can carry a NUL
        raise ShardListError(f"{src}:{line}: shard id {shard_id!r} contains a NUL byte")
    first = index.add(shard_id, len(lines))
    if first != len(lines):
        raise ShardListError(
            f"{src}:{line}: duplicate shard id {shard_id!r} (first at line {lines[first]})"
        )
    lines.append(line)


def _check_header(header: tuple[str, ...], src: str, line: int) -> int:
    seen: dict[str, int] = {}
    for col, name in enumerate(header, 1):
        if not name.strip():
            raise ShardListError(f"{src}:{line}: empty column name in header (column {col})")
        if name in seen:
            raise ShardListError(
                f"{src}:{line}: duplicate column name {name!r} in header "
                f"(columns {seen[name]} and {col})"
            )
        seen[name] = col
    return header.index("id") if "id" in seen else 0


def _load_jsonl(text: str, src: str, abspath: str) -> ShardList:
    records: list[dict[str, Any]] = []
    ids: list[str] = []
    lines = array(_OFFSET if len(text) < 2**31 else "q")
    index = IdIndex(ids.__getitem__, text.count("\n") + 1)
    for number, raw in enumerate(_physical_lines(text), 1):
        if not raw.strip():
            continue
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ShardListError(
                f"{src}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ShardListError(
                f"{src}:{number}: expected a JSON object, got {_json_kind(record)}"
            )
        shard_id = _jsonl_id(record, src, number)
        ids.append(shard_id)  # first: the index reads ids through ``ids``
        _add_id(index, lines, shard_id, number, src)
        records.append(record)
    if not records:
        raise ShardListError(f"{src}: no shards (no JSON lines)")
    return ShardList(
        source=src,
        path=abspath,
        format="jsonl",
        fields=common_keys(records),
        length=len(records),
        id_at=ids.__getitem__,
        record_at=records.__getitem__,
        line_at=lines.__getitem__,
        index_of=index.get,
    )


def _jsonl_id(record: Mapping[str, Any], src: str, line: int) -> str:
    if not record:
        raise ShardListError(f"{src}:{line}: empty JSON object (no field for the shard id)")
    key = "id" if "id" in record else next(iter(record))
    value = record[key]
    if isinstance(value, str):
        shard_id = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        shard_id = orjson.dumps(value).decode() if isinstance(value, float) else str(value)
    else:
        raise ShardListError(
            f"{src}:{line}: shard id in field {key!r} must be a string or number, "
            f"got {_json_kind(value)}"
        )
    if not shard_id.strip():
        raise ShardListError(f"{src}:{line}: empty shard id in field {key!r}")
    return shard_id


def _json_kind(value: object) -> str:
    kinds = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
    }
    return kinds.get(type(value), "an object")


def _load_text(text: str, src: str, abspath: str) -> ShardList:
    values: list[str] = []
    lines = array(_OFFSET if len(text) < 2**31 else "q")
    index = IdIndex(values.__getitem__, text.count("\n") + 1)
    for number, raw in enumerate(_physical_lines(text), 1):
        value = raw.strip()
        if not value:
            continue
        values.append(value)  # first: the index reads ids through ``values``
        _add_id(index, lines, value, number, src)
    if not values:
        raise ShardListError(f"{src}: no shards (the file has no non-blank lines)")
    return ShardList(
        source=src,
        path=abspath,
        format="text",
        fields=frozenset({"line"}),
        length=len(values),
        id_at=values.__getitem__,
        record_at=lambda i: {"line": values[i]},
        line_at=lines.__getitem__,
        index_of=index.get,
    )
