"""Issue 10: what a PHP/shell/Node batch user trips over, tested without processes.

Each test names the item of issue 10 it holds to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import TemplateError, closest
from orchestrator.sources import load_shards
from orchestrator.template import CommandTemplate, Template, check_fields, shard_values

# --- item 2: only {identifier} / {dotted.identifier} is a field -------------------------


@pytest.mark.parametrize(
    "text",
    [
        'echo "##orch {\\"total\\": 10}"',  # JSON in sh -c
        '##orch {"done": 1, "total": 3}',
        "echo ${HOME} ${#x} ${x:-y}",  # shell parameter expansion
        "awk '{print $1} END {n++}'",  # awk programs
        "find . -exec cat {} ;",  # an empty pair
        "{1..5} {a,b} {a b} {x-y} {9} {.a} {a.} {a..b}",
        "lone { and } and {",
    ],
)
def test_non_identifier_braces_pass_through(text: str) -> None:
    t = Template.compile(text, where="argv[2]")
    assert t.fields == frozenset()
    assert t.render({}) == text


def test_identifier_and_dotted_fields_are_fields() -> None:
    t = Template.compile("{id} {checkpoint.page} {a_b.c2.0} {_x}", where="w")
    assert t.fields == {"id", "checkpoint.page", "a_b.c2.0", "_x"}


def test_double_braces_still_escape() -> None:
    t = Template.compile("{{id}} {{{id}}} {\"k\": {id}}", where="w")
    assert t.fields == {"id"}
    assert t.render({"id": "7"}) == '{id} {7} {"k": 7}'


def test_sh_c_json_line_renders_literally_and_quotes_fields() -> None:
    ct = CommandTemplate.compile(
        ["sh", "-c", 'echo "##orch {\\"total\\": 10, \\"id\\": \\"{id}\\"}"'], {}, where="c"
    )
    argv = ct.render_argv({"id": "a b"})
    assert argv[2] == "echo \"##orch {\\\"total\\\": 10, \\\"id\\\": \\\"'a b'\\\"}\""


def test_dotted_fields_reach_into_checkpoint_and_record() -> None:
    shards = load_shards(split=1)
    ct = CommandTemplate.compile(["p", "--page={checkpoint.page}"], {}, where="c")
    first = shard_values(shards[0], 1, "", fields=ct.fields, checkpoint_value=None)
    assert ct.render_argv(first) == ["p", "--page="]
    later = shard_values(
        shards[0], 1, '{"page": 7}', fields=ct.fields, checkpoint_value={"page": 7}
    )
    assert ct.render_argv(later) == ["p", "--page=7"]


def test_dotted_record_field(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "addr": {"city": "Oslo", "zip": ["0150"]}}\n')
    shards = load_shards(str(path))
    ct = CommandTemplate.compile(["p", "{addr.city}", "{addr.zip.0}", "{addr.nope}"], {}, where="c")
    check_fields(ct, shards)
    values = shard_values(shards[0], 1, fields=ct.fields)
    assert ct.render_argv(values) == ["p", "Oslo", "0150", ""]


def test_dotted_field_with_unknown_root_is_refused() -> None:
    ct = CommandTemplate.compile(["p", "{chekpoint.page}"], {}, where="c")
    with pytest.raises(TemplateError, match="did you mean 'checkpoint'"):
        check_fields(ct, load_shards(split=2))


def test_idx_suggests_index() -> None:
    ct = CommandTemplate.compile(["p", "{idx}"], {}, where="c")
    with pytest.raises(TemplateError) as info:
        check_fields(ct, load_shards(split=2))
    assert "no field 'idx'" in str(info.value)
    assert str(info.value).endswith("did you mean 'index'?")


@pytest.mark.parametrize(
    ("word", "candidates", "expected"),
    [
        ("idx", ["index", "count", "id", "checkpoint"], "index"),
        ("indx", ["index", "count", "id", "checkpoint"], "index"),
        ("merchant", ["id", "name", "merchant_id"], "merchant_id"),
        ("nmae", ["id", "name"], "name"),
        ("comand", ["command", "call", "cwd"], "command"),
        ("zzz", ["index", "count"], None),
    ],
)
def test_closest(word: str, candidates: list[str], expected: str | None) -> None:
    assert closest(word, candidates) == expected
