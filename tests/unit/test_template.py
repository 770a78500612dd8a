"""Command templates: substitution, brace escapes, no shell injection, field checks."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import TemplateError
from orchestrator.sources import Shard, ShardList, load_shards
from orchestrator.template import (
    BUILTIN_FIELDS,
    CommandTemplate,
    Template,
    check_fields,
    shard_values,
)

# ----------------------------------------------------------------------------- Template


def test_render_substitutes_fields() -> None:
    t = Template.compile("--merchant={id} --n {count}", where="argv[1]")
    assert t.fields == {"id", "count"}
    assert t.render({"id": "acme", "count": "3"}) == "--merchant=acme --n 3"


def test_only_identifiers_are_fields() -> None:
    t = Template.compile("{merchant id}/{shop-url}/{ x }/{merchant_id}", where="w")
    assert t.fields == {"merchant_id"}
    assert t.render({"merchant_id": "1"}) == "{merchant id}/{shop-url}/{ x }/1"


def test_double_braces_are_literal() -> None:
    t = Template.compile("{{id}} {{{id}}} }}{{", where="w")
    assert t.fields == {"id"}
    assert t.render({"id": "7"}) == "{id} {7} }{"


def test_no_format_specs() -> None:
    t = Template.compile("{n:>5}{x!r}", where="w")
    assert t.fields == frozenset()
    assert t.render({}) == "{n:>5}{x!r}"


def test_template_without_fields_renders_constant() -> None:
    t = Template.compile("plain", where="w")
    assert t.fields == frozenset()
    assert t.render({}) == "plain"


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("abc{", "abc{"),
        ("a}b", "a}b"),
        ("{}", "{}"),
        ("x {a{b}", "x {aB"),
        ("{a}}", "A}"),
        ("{{{", "{{"),
    ],
)
def test_lone_braces_are_literal(text: str, rendered: str) -> None:
    t = Template.compile(text, where="orch.toml: [tasks.crawl] command argv[2]")
    assert t.render({"a": "A", "b": "B"}) == rendered


def test_render_missing_value_is_a_template_error() -> None:
    t = Template.compile("{id}-{nope}", where="argv[1]")
    with pytest.raises(TemplateError, match=r"argv\[1\]: no value for field 'nope'"):
        t.render({"id": "x"})


@given(st.text(max_size=40))
def test_compile_never_crashes(text: str) -> None:
    try:
        t = Template.compile(text, where="w")
    except TemplateError as exc:
        assert str(exc).startswith("w: ")
        assert "\n" not in str(exc)
    else:
        t.render({name: "v" for name in t.fields})


_piece = st.one_of(
    # No "$": a brace right after one is shell syntax (${VAR}), never a field.
    st.tuples(st.just("lit"), st.text(max_size=8).filter(lambda s: "$" not in s)),
    st.tuples(
        st.just("field"),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,4}(\.[A-Za-z0-9_]{1,3})?", fullmatch=True),
    ),
)


@given(st.lists(_piece, max_size=8), st.text(max_size=6))
def test_round_trip_escaped_literals_and_fields(pieces: list[tuple[str, str]], value: str) -> None:
    text = "".join(
        "{" + s + "}" if kind == "field" else s.replace("{", "{{").replace("}", "}}")
        for kind, s in pieces
    )
    t = Template.compile(text, where="w")
    assert t.fields == {s for kind, s in pieces if kind == "field"}
    expected = "".join(value if kind == "field" else s for kind, s in pieces)
    assert t.render({name: value for name in t.fields}) == expected


@given(st.from_regex(r"[a-z ]{0,5}(\{[a-z]{1,3}\}|\{\{|\}\}|[a-z ]{1,4}){0,6}", fullmatch=True))
def test_matches_str_format_for_simple_names(text: str) -> None:
    t = Template.compile(text, where="w")
    values = {name: f"<{name}>" for name in t.fields}
    assert t.render(values) == text.format(**values)


# ----------------------------------------------------------------------------- CommandTemplate


def test_values_never_pass_through_a_shell() -> None:
    ct = CommandTemplate.compile(["php", "crawl.php", "--m={id}", "{id}"], {}, where="command")
    evil = "x; rm -rf ~ $(reboot) `id` 'q\" \n"
    argv = ct.render_argv({"id": evil})
    assert argv == ["php", "crawl.php", "--m=" + evil, evil]


def test_shell_mode_quotes_every_value() -> None:
    ct = CommandTemplate.compile(["echo {id} && echo {name}"], {}, shell=True, where="command")
    evil = "x; rm -rf ~ 'q' $(boom)"
    argv = ct.render_argv({"id": evil, "name": "plain"})
    assert argv[:2] == ["/bin/sh", "-c"]
    assert shlex.split(argv[2]) == ["echo", evil, "&&", "echo", "plain"]


def test_shell_mode_requires_one_string() -> None:
    with pytest.raises(TemplateError, match="one string, got 2"):
        CommandTemplate.compile(["echo", "{id}"], {}, shell=True, where="command")


def test_empty_command_is_an_error() -> None:
    with pytest.raises(TemplateError, match="command: empty command"):
        CommandTemplate.compile([], {}, where="command")


def test_fields_union_over_argv_and_env() -> None:
    ct = CommandTemplate.compile(["run", "{a}"], {"X": "{b}-{c}", "Y": "const"}, where="c")
    assert ct.fields == {"a", "b", "c"}
    assert ct.render_env({"a": "1", "b": "2", "c": "3"}) == {"X": "2-3", "Y": "const"}


def test_env_values_are_not_shell_quoted() -> None:
    ct = CommandTemplate.compile(["sh {id}"], {"ID": "{id}"}, shell=True, where="c")
    assert ct.render_env({"id": "a b"}) == {"ID": "a b"}


def test_nul_byte_in_argv_names_the_element() -> None:
    ct = CommandTemplate.compile(["a", "b", "--x={id}"], {}, where="command")
    with pytest.raises(TemplateError) as info:
        ct.render_argv({"id": "bad\0value"})
    assert "argv[2]" in str(info.value)
    assert "NUL bytes cannot be passed to a process" in str(info.value)


def test_nul_byte_in_env_names_the_variable() -> None:
    ct = CommandTemplate.compile(["a"], {"FOO": "{id}"}, where="command")
    with pytest.raises(TemplateError, match=r"env FOO .*NUL bytes cannot be passed to a process"):
        ct.render_env({"id": "\0"})


def test_nul_byte_in_shell_script() -> None:
    ct = CommandTemplate.compile(["echo {id}"], {}, shell=True, where="command")
    with pytest.raises(TemplateError, match="NUL"):
        ct.render_argv({"id": "\0"})


@pytest.mark.parametrize("key", ["", "A=B", "A\0"])
def test_invalid_env_names(key: str) -> None:
    with pytest.raises(TemplateError, match="invalid environment variable name"):
        CommandTemplate.compile(["a"], {key: "v"}, where="command")


def test_missing_value_names_the_argv_index() -> None:
    ct = CommandTemplate.compile(["a", "{nope}"], {}, where="command")
    with pytest.raises(TemplateError, match=r"^command argv\[1\]: no value for field 'nope'"):
        ct.render_argv({})


@given(st.text(max_size=30).filter(lambda s: "\0" not in s))
def test_any_value_arrives_byte_for_byte(value: str) -> None:
    ct = CommandTemplate.compile(["prog", "{v}", "pre{v}post"], {"V": "{v}"}, where="c")
    assert ct.render_argv({"v": value}) == ["prog", value, f"pre{value}post"]
    assert ct.render_env({"v": value}) == {"V": value}


@given(st.text(max_size=30).filter(lambda s: "\0" not in s))
def test_shell_quoting_round_trips(value: str) -> None:
    ct = CommandTemplate.compile(["prog {v}"], {}, shell=True, where="c")
    assert shlex.split(ct.render_argv({"v": value})[2]) == ["prog", value]


# ----------------------------------------------------------------------------- values


def test_shard_values_stringify_and_builtins_win() -> None:
    record = {
        "id": "record-id",
        "n": 42,
        "ok": True,
        "f": 1.5,
        "none": None,
        "tags": ["a", 1],
        "obj": {"k": "v"},
        "s": "text",
        "index": "x",
    }
    shard = Shard(index=3, id="acme", record=record, line=4)
    values = shard_values(shard, 10, checkpoint="page=7")
    assert values["n"] == "42"
    assert values["ok"] == "true"
    assert values["f"] == "1.5"
    assert values["none"] == ""
    assert values["tags"] == '["a",1]'
    assert values["obj"] == '{"k":"v"}'
    assert values["s"] == "text"
    assert values["index"] == "3"
    assert values["count"] == "10"
    assert values["id"] == "acme"
    assert values["checkpoint"] == "page=7"
    assert {"index", "count", "id", "checkpoint"} == BUILTIN_FIELDS


def test_shard_values_default_checkpoint_is_empty() -> None:
    values = shard_values(Shard(0, "7", {"value": 7}, 0), 1)
    assert values == {"value": "7", "index": "0", "count": "1", "id": "7", "checkpoint": ""}


def test_shard_values_huge_int_falls_back_to_str() -> None:
    values = shard_values(Shard(0, "a", {"big": 10**30}, 1), 1)
    assert values["big"] == str(10**30)


# ----------------------------------------------------------------------------- check_fields


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_check_fields_passes_with_builtins_and_columns(tmp_path: Path) -> None:
    shards = load_shards(_write(tmp_path / "m.csv", "id,name\na,x\nb,y\n"))
    ct = CommandTemplate.compile(
        ["p", "{id}", "{name}", "{index}/{count}", "{checkpoint}"], {}, where="c"
    )
    check_fields(ct, shards)


def test_check_fields_csv_names_column_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path / "merchants.csv", "id,name,merchant_id\na,x,1\n")
    ct = CommandTemplate.compile(["p", "{merchant}"], {}, where="c")
    with pytest.raises(TemplateError) as info:
        check_fields(ct, load_shards(path))
    assert str(info.value) == (
        f"{path}: no column 'merchant' used by the command (columns: id, name, merchant_id); "
        "did you mean 'merchant_id'?"
    )


def test_check_fields_jsonl_names_first_record_lacking_it(tmp_path: Path) -> None:
    lines = ['{"id": "a", "merchant": "m", "name": "n"}'] * 1
    lines += [f'{{"id": "r{i}", "merchant": "m"}}' for i in range(3)]
    lines += ["", '{"id": "x", "name": "nm"}', '{"id": "y"}']
    path = _write(tmp_path / "m.jsonl", "\n".join(lines) + "\n")
    shards = load_shards(path)
    ct = CommandTemplate.compile(["p"], {"M": "{merchant}"}, where="c")
    with pytest.raises(TemplateError) as info:
        check_fields(ct, shards)
    assert str(info.value) == (
        f"{path}:6: record has no field 'merchant' used by the command (fields: id, name)"
    )


def test_check_fields_split_lists_builtins() -> None:
    ct = CommandTemplate.compile(["p", "{indx}"], {}, where="c")
    with pytest.raises(TemplateError) as info:
        check_fields(ct, load_shards(split=4))
    assert str(info.value) == (
        "--split 4: no field 'indx' used by the command (fields: index, count, id, checkpoint); "
        "did you mean 'index'?"
    )


def test_check_fields_range_has_value() -> None:
    ct = CommandTemplate.compile(["p", "{value}"], {}, where="c")
    check_fields(ct, load_shards(range_="1..3"))


def test_check_fields_large_list_uses_common_fields(tmp_path: Path) -> None:
    rows = "".join(f"s{i},{i}\n" for i in range(100_000))
    shards = load_shards(_write(tmp_path / "big.csv", "id,n\n" + rows))
    ct = CommandTemplate.compile(["p", "{n}", "{id}"], {}, where="c")
    check_fields(ct, shards)
    records: list[tuple[str, dict[str, object], int]] = [
        (f"s{i}", {"id": f"s{i}", "n": i}, i + 1) for i in range(100_000)
    ]
    records[99_999] = ("last", {"id": "last"}, 100_000)
    rebuilt = ShardList.from_records(records, source="big.jsonl", format="jsonl")
    with pytest.raises(TemplateError, match=r"^big.jsonl:100000: record has no field 'n'"):
        check_fields(ct, rebuilt)


# --- fields inside an explicit `sh -c SCRIPT` are shell-quoted -----------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sh", "-c", "echo {name}"], {2}),
        (["/bin/bash", "-ec", "echo {name}", "arg0"], {2}),
        (["timeout", "5", "sh", "-c", "echo {name}"], {4}),
        (["python", "-c", "print(1)"], set()),
        (["sh", "script.sh", "{name}"], set()),
        (["sh", "--", "-c"], set()),
    ],
)
def test_shell_scripts_are_found(argv: list[str], expected: set[int]) -> None:
    from orchestrator.template import shell_scripts

    assert shell_scripts(argv) == expected


def test_sh_c_script_values_are_quoted_and_other_elements_verbatim() -> None:
    import subprocess

    tpl = CommandTemplate.compile(["sh", "-c", "printf '%s|' {name}", "{name}"], {}, where="c")
    evil = "x; echo INJECTED"
    argv = tpl.render_argv({"name": evil})
    assert argv[3] == evil  # $0 of the script: verbatim, not code
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out == evil + "|"
