"""Shard lists: formats, id rules, line numbers, every error as one line."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import sources
from orchestrator.errors import ShardListError
from orchestrator.sources import Shard, ShardList, load_shards, parse_range
from orchestrator.sources import files as readers


def _write(path: Path, data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return str(path)


def _error(path: str | None = None, **kwargs: Any) -> str:
    with pytest.raises(ShardListError) as info:
        load_shards(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- CSV


def test_csv_basic(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "name,id,country\nAcme,acme,DE\nBeta,beta,FR\n")
    shards = load_shards(path)
    assert len(shards) == 2
    assert shards.format == "csv"
    assert shards.source == path
    assert shards.path == os.path.abspath(path)
    assert shards.fields == {"name", "id", "country"}
    assert shards[0] == Shard(0, "acme", {"name": "Acme", "id": "acme", "country": "DE"}, 2)
    assert shards[-1].id == "beta"
    assert [s.id for s in shards] == ["acme", "beta"]
    assert shards.index_of("beta") == 1
    assert shards.index_of("nope") is None
    assert [s.id for s in shards[0:2]] == ["acme", "beta"]
    with pytest.raises(IndexError):
        shards[2]


def test_csv_id_defaults_to_first_column(tmp_path: Path) -> None:
    shards = load_shards(_write(tmp_path / "m.csv", "merchant,url\nacme,http://a\n"))
    assert shards[0].id == "acme"


def test_csv_bom_blank_lines_and_crlf(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfid,n\r\n\r\na,1\r\n\r\n   \r\nb,2\r\n"
    shards = load_shards(_write(tmp_path / "m.csv", data))
    assert shards.fields == {"id", "n"}
    assert [(s.id, s.line, s.record["n"]) for s in shards] == [("a", 3, "1"), ("b", 6, "2")]
    assert list(shards) == [shards[0], shards[1]]


def test_csv_quoted_newlines_keep_physical_line_numbers(tmp_path: Path) -> None:
    data = 'id,note\na,"two\nlines"\nb,"x"\nc,"three\n\nlines"\nd,y\n'
    shards = load_shards(_write(tmp_path / "m.csv", data))
    assert [(s.id, s.line) for s in shards] == [("a", 2), ("b", 4), ("c", 5), ("d", 8)]
    assert shards[2].record["note"] == "three\n\nlines"
    assert list(shards) == [shards[i] for i in range(4)]


def test_csv_width_error_after_quoted_newline_names_physical_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "merchants.csv", 'id,a,b\nx,"1\n2",3\ny,1\n')
    assert _error(path) == f"{path}:4: row has 2 fields, header has 3"


def test_tsv_by_extension_and_by_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.tsv", "id\tname\na\tx,y\n")
    shards = load_shards(path)
    assert shards.format == "csv"
    assert shards[0].record == {"id": "a", "name": "x,y"}
    other = _write(tmp_path / "m.data", "id\tname\nb\tz\n")
    assert load_shards(other, fmt="tsv")[0].record == {"id": "b", "name": "z"}


def test_csv_unicode_values_and_line_separators(tmp_path: Path) -> None:
    data = 'id,v\nä,"x\u2028y\x0cz"\n'
    shards = load_shards(_write(tmp_path / "m.csv", data))
    assert shards[0].id == "ä"
    assert shards[0].record["v"] == "x\u2028y\x0cz"


def test_csv_100k_rows(tmp_path: Path) -> None:
    header = "id,name,country,url,score\n"
    rows = "".join(
        f"m{i},Merchant {i},DE,https://example.com/shop/{i},{i % 1000}\n" for i in range(100_000)
    )
    shards = load_shards(_write(tmp_path / "big.csv", header + rows))
    assert len(shards) == 100_000
    assert shards[0] == Shard(
        0,
        "m0",
        {
            "id": "m0",
            "name": "Merchant 0",
            "country": "DE",
            "url": "https://example.com/shop/0",
            "score": "0",
        },
        2,
    )
    assert shards[99_999].id == "m99999"
    assert shards[99_999].line == 100_001
    assert shards[54_321].record["score"] == "321"
    assert shards.index_of("m77777") == 77_777


_cell = st.text(st.characters(codec="utf-8"), max_size=8)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.lists(st.tuples(_cell, _cell), max_size=12), st.sampled_from([",", "\t"]))
def test_csv_round_trip(tmp_path: Path, rows: list[tuple[str, str]], delimiter: str) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(["id", "value"])
    expected = []
    for i, (a, b) in enumerate(rows):
        row = (f"k{i}{a}", b)
        writer.writerow(row)
        expected.append(row)
    name = "r.tsv" if delimiter == "\t" else "r.csv"
    path = _write(tmp_path / name, buffer.getvalue())
    if not expected:
        assert "no shards" in _error(path)
        return
    if any("\0" in row[0] for row in expected):  # no process environment can carry it
        assert "contains a NUL byte" in _error(path)
        return
    shards = load_shards(path)
    assert [(s.id, s.record["value"]) for s in shards] == expected
    # Ids are slices of the text, or kept aside when quoted: the index finds every one.
    assert [shards.index_of(row[0]) for row in expected] == list(range(len(expected)))
    assert shards.index_of("no such id") is None
    # Iterating reads every record with one reader; indexing parses one: the same shards.
    assert list(shards) == [shards[i] for i in range(len(shards))]


def test_csv_ids_quoted_or_not_in_any_column(tmp_path: Path) -> None:
    data = (
        "name,id,n\n"
        "Acme,acme,1\n"
        '"A, ""quoted""",b,2\n'  # a quote before the id: the id is kept aside
        'C,"c,1",3\n'  # a quoted id
        'D,"d",4\n'  # quoted but plain
        "E,e\u00e9,5\r\n"  # CRLF, a non-ASCII id
    )
    shards = load_shards(_write(tmp_path / "m.csv", data))
    ids = ["acme", "b", "c,1", "d", "e\u00e9"]
    assert [s.id for s in shards] == ids
    assert [shards.id_at(i) for i in range(len(ids))] == ids
    assert [shards.index_of(i) for i in ids] == [0, 1, 2, 3, 4]
    assert shards.index_of('"d"') is None and shards.index_of("c") is None
    assert shards[1].record == {"name": 'A, "quoted"', "id": "b", "n": "2"}
    assert shards[4].record == {"name": "E", "id": "e\u00e9", "n": "5"}


def test_csv_duplicate_of_a_quoted_id_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", 'id,n\n"a,b",1\nx,2\n"a,b",3\n')
    assert _error(path) == f"{path}:4: duplicate shard id 'a,b' (first at line 2)"
    path = _write(tmp_path / "p.csv", 'n,id\n1,a\n"2",a\n')
    assert _error(path) == f"{path}:3: duplicate shard id 'a' (first at line 2)"


def test_id_index_grows_and_finds_every_id() -> None:
    from orchestrator.sources.model import IdIndex

    ids: list[str] = []
    index = IdIndex(ids.__getitem__)  # no size given: starts small, grows as ids come
    for i in range(5000):
        ids.append(f"id-{i * 7919 % 5003}")
        assert index.add(ids[-1], i) == i
    assert len(index) == 5000
    assert all(index.get(shard_id) == i for i, shard_id in enumerate(ids))
    ids.append(ids[1234])
    assert index.add(ids[-1], 5000) == 1234  # a duplicate: the first one's index
    assert len(index) == 5000
    assert index.get("id-5003") is None and index.get("") is None


# ----------------------------------------------------------------------------- JSON lines


def test_jsonl_basic_and_id_rules(tmp_path: Path) -> None:
    lines = [
        '{"id": "acme", "n": 1}',
        "",
        '{"id": 42, "n": 2}',
        '{"id": 1.5}',
        '{"merchant": "beta", "id2": 1}',
        '{"num": 7}',
    ]
    path = _write(tmp_path / "m.jsonl", "\n".join(lines))
    shards = load_shards(path)
    assert shards.format == "jsonl"
    assert [(s.id, s.line) for s in shards] == [
        ("acme", 1),
        ("42", 3),
        ("1.5", 4),
        ("beta", 5),
        ("7", 6),
    ]
    assert shards[1].record == {"id": 42, "n": 2}
    assert shards.fields == frozenset()


def test_jsonl_common_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.ndjson", '{"id": "a", "x": 1, "y": 2}\n{"id": "b", "x": null}\n')
    assert load_shards(path).fields == {"id", "x"}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(
                st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5)
            ),
            max_size=4,
        ),
        max_size=8,
    )
)
def test_jsonl_round_trip(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    records = [{"id": f"r{i}", **r} for i, r in enumerate(records)]
    for i, r in enumerate(records):
        r["id"] = f"r{i}"
    path = _write(tmp_path / "r.jsonl", b"\n".join(orjson.dumps(r) for r in records))
    if not records:
        assert "no shards" in _error(path)
        return
    shards = load_shards(path)
    assert [dict(s.record) for s in shards] == records
    assert [s.line for s in shards] == list(range(1, len(records) + 1))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{bad json}", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"text"', "expected a JSON object, got a string"),
        ("{}", "empty JSON object"),
        ('{"id": ""}', "empty shard id in field 'id'"),
        ('{"id": null}', "shard id in field 'id' must be a string or number, got null"),
        ('{"id": true}', "must be a string or number, got a boolean"),
        ('{"k": [1]}', "shard id in field 'k' must be a string or number, got an array"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "m.jsonl", '{"id": "ok"}\n\n' + line + "\n")
    error = _error(path)
    assert error.startswith(f"{path}:3: ")
    assert message in error


def test_jsonl_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", '{"id": "a"}\n{"id": 1}\n{"id": "1"}\n')
    assert _error(path) == f"{path}:3: duplicate shard id '1' (first at line 2)"


# ----------------------------------------------------------------------------- text, split, range


def test_text_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "urls.txt", "  https://a  \n\n\thttps://b\n")
    shards = load_shards(path)
    assert shards.format == "text"
    assert shards.fields == {"line"}
    assert list(shards) == [
        Shard(0, "https://a", {"line": "https://a"}, 1),
        Shard(1, "https://b", {"line": "https://b"}, 3),
    ]


def test_text_format_forced_for_csv_extension(tmp_path: Path) -> None:
    shards = load_shards(_write(tmp_path / "m.csv", "a,b\nc,d\n"), fmt="text")
    assert [s.id for s in shards] == ["a,b", "c,d"]


def test_split() -> None:
    shards = load_shards(split=4)
    assert (shards.source, shards.path, shards.format) == ("--split 4", None, "split")
    assert len(shards) == 4
    assert list(shards) == [Shard(i, str(i), {}, 0) for i in range(4)]
    assert shards.index_of("3") == 3
    assert shards.index_of("4") is None
    assert shards.index_of("03") is None


def test_range_inclusive() -> None:
    shards = load_shards(range_="1..10")
    assert shards.source == "--range 1..10"
    assert shards.format == "range"
    assert len(shards) == 10
    assert shards.fields == {"value"}
    assert shards[0] == Shard(0, "1", {"value": 1}, 0)
    assert shards[9].id == "10"
    assert shards.index_of("10") == 9
    assert shards.index_of("0") is None
    assert [s.record["value"] for s in load_shards(range_="-2..0")] == [-2, -1, 0]
    assert len(load_shards(range_="5..5")) == 1


@pytest.mark.parametrize("text", ["", "1", "1-10", "a..b", "1..", "..3", "1...3", "1.5..3"])
def test_range_malformed(text: str) -> None:
    assert _error(range_=text).startswith(f"--range: invalid range {text!r}")


def test_range_reversed() -> None:
    assert _error(range_="10..1") == "--range: end 1 is before start 10 in '10..1'"


def test_parse_range_where() -> None:
    assert parse_range(" 3 .. 7 ", where="x") == (3, 7)
    with pytest.raises(ShardListError, match=r"^orch\.toml: range: invalid range"):
        parse_range(5, where="orch.toml: range")


@pytest.mark.parametrize("n", [0, -3])
def test_split_must_be_positive(n: int) -> None:
    assert _error(split=n) == f"--split: must be at least 1, got {n}"


def test_split_limits_and_types() -> None:
    assert "at most" in _error(split=sources.MAX_VIRTUAL_SHARDS + 1)
    assert "whole number" in _error(split=True)
    assert "more than the limit" in _error(range_="1..100000000000")


def test_exactly_one_source() -> None:
    assert _error() == "no shard list: give --shards FILE, --split N or --range A..B"
    assert _error("x.csv", split=2) == "give only one shard list, got --shards and --split"


def test_from_records_round_trip(tmp_path: Path) -> None:
    original = load_shards(_write(tmp_path / "m.csv", "id,n\na,1\nb,2\n"))
    rows = [(s.id, s.record, s.line) for s in original]
    rebuilt = ShardList.from_records(rows, source="m.csv", format="csv")
    assert list(rebuilt) == list(original)
    assert rebuilt.fields == original.fields
    assert rebuilt.index_of("b") == 1
    assert len(ShardList.from_records([], source="s", format="split")) == 0
    with pytest.raises(ShardListError, match="duplicate shard id 'a'"):
        ShardList.from_records([("a", {}, 0), ("a", {}, 0)], source="s", format="split")


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _error("merchants.csv") == "merchants.csv: no such file"


def test_directory(tmp_path: Path) -> None:
    assert _error(str(tmp_path)) == f"{tmp_path}: is a directory, not a shard list file"


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "m.csv", "id\na\n")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(readers, "open", deny, raising=False)
    assert _error(path) == f"{path}: permission denied"


def test_other_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(readers, "open", fail, raising=False)
    assert _error("m.csv") == "m.csv: cannot read (Input/output error)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "id\na\n")
    os.chmod(path, 0)
    assert _error(path) == f"{path}: permission denied"


def test_not_utf8_names_line_and_column(tmp_path: Path) -> None:
    data = b"id,n\n" + b"a,1\n" * 5 + b"x,\xff\n"
    path = _write(tmp_path / "x.csv", data)
    assert _error(path) == f"{path}:7: not valid UTF-8 (byte 0xff at column 3)"


def test_empty_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "")
    assert _error(path) == f"{path}: no header row (the file is empty)"
    assert _error(_write(tmp_path / "b.csv", "\n\n")).endswith("no header row (the file is empty)")


def test_header_without_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "merchants.csv", "id,name\n\n")
    assert _error(path) == f"{path}: no shards (header but no rows)"


def test_empty_header_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "\nid,,name\na,b,c\n")
    assert _error(path) == f"{path}:2: empty column name in header (column 2)"


def test_duplicate_header_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "id,name,id\na,b,c\n")
    assert _error(path) == f"{path}:1: duplicate column name 'id' in header (columns 1 and 3)"


def test_row_of_wrong_width(tmp_path: Path) -> None:
    rows = "".join(f"x{i},1,2\n" for i in range(5))
    path = _write(tmp_path / "merchants.csv", "id,a,b\n" + rows + "y,1,2,3\n")
    assert _error(path) == f"{path}:7: row has 4 fields, header has 3"


def test_empty_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", "merchant_id,name\n1,a\n2,b\n\n,d\n")
    assert _error(path) == f"{path}:5: empty shard id in column 'merchant_id'"
    blank = _write(tmp_path / "y.csv", "name,id\na,1\nb,  \n")
    assert _error(blank) == f"{blank}:3: empty shard id in column 'id'"


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    rows = ["x1", "x2", "acme", "x3", "x4", "x5", "x6", "acme"]
    path = _write(tmp_path / "merchants.csv", "id,n\n\n" + "".join(f"{r},1\n" for r in rows))
    assert _error(path) == f"{path}:10: duplicate shard id 'acme' (first at line 5)"


def test_malformed_csv_quote(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", 'id,n\na,1\nb,"unclosed\n')
    assert _error(path).startswith(f"{path}:3: malformed CSV (")


def test_text_duplicate_and_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "l.txt", "a\nb\n a \n")
    assert _error(path) == f"{path}:3: duplicate shard id 'a' (first at line 1)"
    empty = _write(tmp_path / "e.txt", " \n\n")
    assert _error(empty) == f"{empty}: no shards (the file has no non-blank lines)"


def test_unknown_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "id\na\n")
    assert _error(path, fmt="xml") == "--format: unknown format 'xml' (use csv, tsv, jsonl or text)"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(st.binary(max_size=80), st.sampled_from(["f.csv", "f.tsv", "f.jsonl", "f.txt"]))
def test_any_bytes_load_or_raise_shard_list_error(tmp_path: Path, data: bytes, name: str) -> None:
    path = _write(tmp_path / name, data)
    try:
        shards = load_shards(path)
    except ShardListError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith(path)
    else:
        assert len(shards) >= 1
        ids = [s.id for s in shards]
        assert len(set(ids)) == len(ids)
        assert all(i.strip() for i in ids)
        assert all(s.line >= 1 for s in shards)
