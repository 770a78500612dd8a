"""Durations and sizes: parsing what users write, and formatting for display.

Users write durations and sizes in orch.toml and on the command line the way
they write them for pm2 or systemd ("30s", "1h30m", "2GB", "200M"). These
functions are the only place that syntax is understood, so the CLI, the config
file and the docs agree. Parsing is strict: a value that is negative, not a
number, infinite or NaN raises ``UnitError`` naming where it came from and the
value, never a traceback and never a silently clamped number.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from orchestrator.errors import UnitError

if TYPE_CHECKING:
    from fractions import Fraction

__all__ = ["format_bytes", "format_duration", "parse_duration", "parse_size", "parse_timeout"]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Seconds per unit as (numerator, denominator). Exact arithmetic uses fractions.Fraction,
# imported when a value is parsed: `orch run -- CMD` parses none (start-up time).
_DURATION_UNITS: dict[str, tuple[int, int]] = {
    "ms": (1, 1000),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
    "d": (86400, 1),
}
_PLAIN_RE = re.compile(rf"\s*({_NUMBER})\s*", re.ASCII)
_DURATION_PART_RE = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)\s*", re.ASCII | re.IGNORECASE)

# Size suffixes: "KB" is decimal (1000), "KiB" is binary (1024) and a bare "K"
# is binary too, as pm2's max_memory_restart reads "200M".
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*(?:([kmgtpe])(i?)(b?)|(b))?\s*", re.ASCII | re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}

_DURATION_HINT = "use seconds or e.g. '500ms', '30s', '5m', '1h'"
_SIZE_HINT = "use bytes or e.g. '512K', '100MB', '2GiB'"


def _show(value: object) -> str:
    """The value as the user wrote it (repr), shortened so an error stays one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object) -> Fraction | None:
    """Return a finite, non-negative int/float as an exact Fraction, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value < 0:
        return None
    from fractions import Fraction

    return Fraction(value)


def parse_duration(value: object, *, where: str) -> float:
    """Parse a duration into seconds.

    Accepts a non-negative int/float (seconds), a numeric string ("30", "1.5")
    or one or more number+unit parts ("500ms", "5m", "1h30m", "1h 30m"), units
    ms/s/m/h/d in any case. Raises ``UnitError`` naming ``where`` and the value
    for anything else, including negative, NaN and infinite values.
    """
    total = _number(value)
    if total is None and isinstance(value, str):
        total = _parse_duration_text(value)
    if total is None:
        raise UnitError(f"{where}: invalid duration {_show(value)} ({_DURATION_HINT})")
    try:
        return float(total)
    except OverflowError:
        raise UnitError(f"{where}: duration {_show(value)} is too large") from None


def parse_timeout(value: object, *, where: str) -> float | None:
    """Parse a timeout: a duration above zero, or ``"none"`` (any case) for no timeout.

    ``0`` is refused rather than read as "off": a zero timeout would fire at once,
    and "0 means off" is a guess a reader of orch.toml cannot check. The error
    names ``none``, the word that switches the check off.
    """
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    seconds = parse_duration(value, where=where)
    if seconds == 0:
        raise UnitError(
            f"{where}: a timeout of {_show(value)} would fire at once; "
            "use 'none' to switch the check off"
        )
    return seconds


def _parse_duration_text(text: str) -> Fraction | None:
    from fractions import Fraction

    plain = _PLAIN_RE.fullmatch(text)
    if plain:
        return Fraction(plain.group(1))
    pos, total, parts = 0, Fraction(0), 0
    while pos < len(text):
        match = _DURATION_PART_RE.match(text, pos)
        if match is None or match.end() == pos:
            return None
        total += Fraction(match.group(1)) * Fraction(*_DURATION_UNITS[match.group(2).lower()])
        pos, parts = match.end(), parts + 1
    return total if parts else None


def parse_size(value: object, *, where: str) -> int:
    """Parse a size into bytes.

    Accepts a non-negative int (bytes), a numeric string ("512") or a number
    with a unit: "100KB"/"2MB"/"2GB" are decimal (1000^n), "100KiB"/"2MiB" and
    the bare "200K"/"200M"/"2G" are binary (1024^n), case-insensitive, with an
    optional fraction ("1.5GB"). The result is rounded down to whole bytes.
    Raises ``UnitError`` naming ``where`` and the value for anything else.
    """
    amount = _number(value)
    if amount is None and isinstance(value, str):
        amount = _parse_size_text(value)
    if amount is None:
        raise UnitError(f"{where}: invalid size {_show(value)} ({_SIZE_HINT})")
    return int(amount)


def _parse_size_text(text: str) -> Fraction | None:
    from fractions import Fraction

    match = _SIZE_RE.fullmatch(text)
    if match is None:
        return None
    number, prefix, binary, suffix_b = match.group(1, 2, 3, 4)
    amount = Fraction(number)
    if prefix is None:
        return amount
    power = _SIZE_POWERS[prefix.lower()]
    decimal = suffix_b != "" and binary == ""
    return amount * (1000 if decimal else 1024) ** power


def format_duration(seconds: float) -> str:
    """Format seconds compactly for a status table.

    Two significant units at most, so columns stay narrow: "450ms", "3.2s",
    "59s", "4m05s", "1h02m", "2d03h". Negative values get a leading "-".
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        ms = round(seconds * 1000)
        if ms < 1000:
            return f"{ms}ms"
    if seconds < 10:
        tenths = round(seconds, 1)
        if tenths < 10:
            return f"{tenths:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m{secs:02d}s"
    if whole < 86400:
        hours, rest = divmod(whole, 3600)
        return f"{hours}h{rest // 60:02d}m"
    days, rest = divmod(whole, 86400)
    return f"{days}d{rest // 3600:02d}h"


_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """Format a byte count with binary units: "512 B", "1.5 KiB", "32.0 MiB"."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _BYTE_UNITS:
        value /= 1024
        if round(value, 1) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
