"""Durations and sizes: the syntax users write, and the display forms."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import UnitError
from orchestrator.units import format_bytes, format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        (" 1h 30m ", 5400.0),
        ("2m30s", 150.0),
        ("1H", 3600.0),
        ("1.5s", 1.5),
        ("1m500ms", 60.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value, where="stop_timeout") == seconds


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1",
        "",
        "   ",
        "abc",
        "1x",
        "s",
        "ms",
        "1h30",
        "1.2.3",
        "nan",
        "inf",
        "1e3",
        True,
        False,
        None,
        float("nan"),
        float("inf"),
        [1],
        {"s": 1},
        "5 m x",
        "1..2s",
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(UnitError) as info:
        parse_duration(value, where="--stop-timeout")
    message = str(info.value)
    assert message.startswith("--stop-timeout: ")
    assert repr(value) in message
    assert "\n" not in message


def test_parse_duration_too_large_is_a_unit_error() -> None:
    with pytest.raises(UnitError, match="too large"):
        parse_duration(10**400, where="x")
    with pytest.raises(UnitError, match=r"^x: "):
        parse_duration("9" * 400, where="x")


@given(st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parse_duration_never_crashes(value: object) -> None:
    try:
        seconds = parse_duration(value, where="w")
    except UnitError as exc:
        assert str(exc).startswith("w: ")
    else:
        assert math.isfinite(seconds) and seconds >= 0


@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500), st.integers(0, 999))
def test_parse_duration_compound_round_trip(h: int, m: int, s: int, ms: int) -> None:
    text = f"{h}h{m}m{s}s{ms}ms"
    assert parse_duration(text, where="w") == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("10b", 10),
        ("100KB", 100_000),
        ("2MB", 2_000_000),
        ("2GB", 2_000_000_000),
        ("100KiB", 102_400),
        ("2MiB", 2 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("200K", 200 * 1024),
        ("200M", 200 * 1024**2),
        ("2G", 2 * 1024**3),
        ("2g", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1.5gib", 1536 * 1024**2),
        (" 64 MiB ", 64 * 1024**2),
        ("1TB", 10**12),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    assert parse_size(value, where="max_memory") == size


@pytest.mark.parametrize(
    "value", [-1, "-1", "", "MB", "1XB", "1.2.3", "nan", True, None, float("inf"), "2 G B", [2]]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(UnitError) as info:
        parse_size(value, where="--max-memory")
    assert str(info.value).startswith("--max-memory: ")
    assert repr(value) in str(info.value)


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parse_size_never_crashes(value: object) -> None:
    try:
        size = parse_size(value, where="w")
    except UnitError as exc:
        assert str(exc).startswith("w: ")
    else:
        assert isinstance(size, int) and size >= 0


@given(st.integers(0, 10**6), st.sampled_from(["K", "M", "G"]))
def test_parse_size_units_round_trip(n: int, prefix: str) -> None:
    power = {"K": 1, "M": 2, "G": 3}[prefix]
    assert parse_size(f"{n}{prefix}B", where="w") == n * 1000**power
    assert parse_size(f"{n}{prefix}iB", where="w") == n * 1024**power
    assert parse_size(f"{n}{prefix}", where="w") == n * 1024**power


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.45, "450ms"),
        (3.2, "3.2s"),
        (59, "59s"),
        (245, "4m05s"),
        (3720, "1h02m"),
        (2 * 86400 + 3 * 3600, "2d03h"),
        (0.9996, "1.0s"),
        (9.96, "10s"),
        (59.6, "1m00s"),
        (-3.2, "-3.2s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=10**8, allow_nan=False))
def test_format_duration_parses_back(seconds: float) -> None:
    text = format_duration(seconds)
    tolerance = 0.0005 if seconds < 1 else 0.05 if seconds < 10 else 0.5
    if seconds >= 3600:
        tolerance = 60 if seconds < 86400 else 3600
    assert abs(parse_duration(text, where="w") - seconds) <= tolerance + 1e-9


def test_format_duration_non_finite() -> None:
    assert format_duration(float("inf")) == "inf"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (32 * 1024**2, "32.0 MiB"),
        (2 * 1024**3, "2.0 GiB"),
        (1024**2 - 1, "1.0 MiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@given(st.integers(0, 2**70))
def test_format_bytes_parses_back(n: int) -> None:
    text = format_bytes(n)
    assert abs(parse_size(text.replace(" ", ""), where="w") - n) <= max(1, n * 0.05)
