"""Byte sizes and byte rates as people write them: ``"4KiB"``, ``"1.5GB"``, ``"400MB/s"``.

Decimal prefixes (kB, MB, GB, ...) are powers of 1000 and binary prefixes (KiB, MiB, GiB, ...) are
powers of 1024, as in IEC 80000-13. A bare ``K``/``M``/``G`` is rejected: tools disagree on it
(``dd`` reads ``K`` as 1024, SI as 1000), and a policy file is the wrong place to guess.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_rate", "format_size", "parse_rate", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_AMBIGUOUS = {"k", "m", "g", "t", "p"}
_NUMBER = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNLIMITED = {"inf", "infinity", "unlimited"}


def _parse(text: str, what: str) -> float:
    match = _NUMBER.match(text)
    if match is None:
        raise ValueError(f"cannot parse {what} {text!r}: expected a number and a unit like '4KiB'")
    number, unit = match.groups()
    unit_key = unit.lower()
    if unit_key in _AMBIGUOUS:
        raise ValueError(
            f"ambiguous unit {unit!r} in {what} {text!r}: write {unit.upper()}B (powers of 1000) "
            f"or {unit.upper()}iB (powers of 1024)"
        )
    if unit_key not in _UNITS:
        known = ", ".join(u for u in _UNITS if u) + " (any case)"
        raise ValueError(f"unknown unit {unit!r} in {what} {text!r}; known units: {known}")
    return float(number.replace("_", "")) * _UNITS[unit_key]


def parse_size(value: str | int | float) -> int:
    """Parse a byte count.

    Parameters
    ----------
    value
        An integer number of bytes, or text such as ``"4KiB"``, ``"1MiB"``, ``"1.5 GB"``, ``"512"``.

    Returns
    -------
    int
        Bytes, rounded to the nearest integer.

    Raises
    ------
    ValueError
        On a negative, non-finite or unparseable value, or an ambiguous unit such as ``"4K"``.

    Examples
    --------
    >>> parse_size("4KiB"), parse_size("1MB"), parse_size(512)
    (4096, 1000000, 512)
    """
    if isinstance(value, bool):
        raise ValueError(f"size must be a number of bytes or text like '4KiB', got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        number = _parse(value, "size")
    else:
        raise ValueError(f"size must be a number of bytes or text like '4KiB', got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"size must be a finite number >= 0, got {value!r}")
    return round(number)


def parse_rate(value: str | int | float) -> float:
    """Parse a byte rate in bytes per second.

    Parameters
    ----------
    value
        A number of bytes/s, or text such as ``"400MB/s"``, ``"1GiB/s"``, ``"100 MB"`` (the ``/s``
        is optional), or ``"unlimited"`` / ``"inf"`` for no limit.

    Returns
    -------
    float
        Bytes per second, ``math.inf`` for unlimited.

    Raises
    ------
    ValueError
        On a zero, negative or unparseable rate.

    Examples
    --------
    >>> parse_rate("400MB/s"), parse_rate("1KiB/s"), parse_rate("unlimited")
    (400000000.0, 1024.0, inf)
    """
    if isinstance(value, bool):
        raise ValueError(f"rate must be bytes/s or text like '400MB/s', got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in _UNLIMITED:
            return math.inf
        if text.lower().endswith("/s"):
            text = text[:-2]
        number = _parse(text, "rate")
    else:
        raise ValueError(f"rate must be bytes/s or text like '400MB/s', got {value!r}")
    if math.isnan(number) or number <= 0:
        raise ValueError(f"rate must be > 0 bytes/s, got {value!r}")
    return number


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary prefix, e.g. ``format_size(1536) == "1.5KiB"``."""
    if math.isinf(nbytes):
        return "unlimited"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".") if unit != "B" else f"{value:.0f}"
            return f"{text}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(rate: float) -> str:
    """Format a rate in bytes/s with decimal prefixes, e.g. ``format_rate(4e8) == "400MB/s"``."""
    if math.isinf(rate):
        return "unlimited"
    value = float(rate)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.3g}{unit}/s"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover
