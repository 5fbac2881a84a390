from __future__ import annotations

import math

import pytest

from iosvc.policies import format_rate, format_size, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4KiB", 4096),
        ("1MiB", 1 << 20),
        ("1mib", 1 << 20),
        ("1.5 GiB", 3 << 29),
        ("1MB", 10**6),
        ("1kB", 1000),
        ("400MB", 400 * 10**6),
        ("512", 512),
        ("512B", 512),
        ("1_000", 1000),
        ("1e3", 1000),
        (65536, 65536),
        (0, 0),
        (2.0, 2),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4K", "ambiguous unit"),
        ("4M", "ambiguous unit"),
        ("4 bananas", "unknown unit"),
        ("", "cannot parse"),
        ("MiB", "cannot parse"),
        ("-1KiB", "cannot parse"),
        (-5, ">= 0"),
        (math.inf, "finite"),
        (True, "size must be"),
        (None, "size must be"),
    ],
)
def test_parse_size_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("400MB/s", 400e6),
        ("100MB/s", 100e6),
        ("1GiB/s", float(1 << 30)),
        ("100 MB", 100e6),
        ("2.5 kB/s", 2500.0),
        (1e6, 1e6),
        ("unlimited", math.inf),
        ("inf", math.inf),
    ],
)
def test_parse_rate(text: str | float, expected: float) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0MB/s", 0, -1, "fast", "4K/s", "nan"])
def test_parse_rate_errors(text: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)  # type: ignore[arg-type]


def test_format_round_trips_through_parse() -> None:
    for n in (0, 1, 1023, 1536, 4096, 3 << 20, 5 << 30):
        text = format_size(n)
        assert abs(parse_size(text) - n) <= 0.05 * n + 1, text
    assert format_size(1536) == "1.5KiB"
    assert format_rate(4e8) == "400MB/s"
    assert format_rate(math.inf) == "unlimited"
    assert parse_rate(format_rate(1.5e9)) == 1.5e9
