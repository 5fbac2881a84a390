"""Value codecs: a name-keyed table, chosen per field kind and dtype.

A codec name is ``"name"`` or ``"name:level"`` (as MosaicML streaming spells compression, e.g.
``"zstd:7"``). Codecs compress one value at a time, so a sample is decoded alone (random
access), FanStore-style: the data stay compressed in the cache and are decompressed in the
worker that uses them.

Why these defaults (numbers from ``shared/reference/machine_limits.md`` section 3, one core):

- floats: Blosc(lz4, shuffle) reaches 1.86x on a smooth float32 field and decompresses at
  3.4 GB/s; plain zstd gives 1.27x and plain LZ4 1.0x. Shuffle needs the item size, so array
  values are handed to Blosc as typed arrays, never as bytes.
- integers: Blosc(zstd, shuffle) (integers compress better with an entropy coder);
  1-byte items use bitshuffle, under which byte shuffle would do nothing.
- bytes and str: zstd if a probe of the first values gains >= 10 %, else stored as they are
  (JPEG bytes gain at most 1.5 % from any codec, so compressing them only costs CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np

__all__ = [
    "CODECS",
    "Codec",
    "choose_array_codec",
    "choose_bytes_codec",
    "get_codec",
]


@dataclass(frozen=True, slots=True)
class Codec:
    """An encoder/decoder pair for one value.

    ``encode`` takes bytes or a typed numpy array (Blosc uses its item size for shuffle) and
    returns bytes; ``decode`` takes a bytes-like object and returns bytes (or the object itself
    for ``none``).
    """

    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[Any], Any]


def _none(level: int | None) -> Codec:
    return Codec("none", lambda v: bytes(v), lambda b: b)


def _zstd(level: int | None) -> Codec:
    codec = numcodecs.Zstd(level=3 if level is None else level)
    return Codec(f"zstd:{codec.level}", lambda v: bytes(codec.encode(v)), codec.decode)


def _lz4(level: int | None) -> Codec:
    codec = numcodecs.LZ4(acceleration=1 if level is None else level)
    return Codec(f"lz4:{codec.acceleration}", lambda v: bytes(codec.encode(v)), codec.decode)


def _blosc(cname: str, shuffle: int, default_level: int) -> Callable[[int | None], Codec]:
    suffix = {numcodecs.Blosc.SHUFFLE: "", numcodecs.Blosc.BITSHUFFLE: "-bitshuffle"}[shuffle]

    def make(level: int | None) -> Codec:
        clevel = default_level if level is None else level
        codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
        return Codec(
            f"blosc-{cname}{suffix}:{clevel}", lambda v: bytes(codec.encode(v)), codec.decode
        )

    return make


#: Codec factories by name; the optional ``:level`` is passed to the factory.
CODECS: dict[str, Callable[[int | None], Codec]] = {
    "none": _none,
    "zstd": _zstd,
    "lz4": _lz4,
    "blosc-lz4": _blosc("lz4", numcodecs.Blosc.SHUFFLE, 5),
    "blosc-zstd": _blosc("zstd", numcodecs.Blosc.SHUFFLE, 3),
    "blosc-lz4-bitshuffle": _blosc("lz4", numcodecs.Blosc.BITSHUFFLE, 5),
    "blosc-zstd-bitshuffle": _blosc("zstd", numcodecs.Blosc.BITSHUFFLE, 3),
}


def get_codec(spec: str) -> Codec:
    """The codec named by ``spec`` (``"zstd"``, ``"zstd:7"``, ``"blosc-lz4"``...)."""
    name, _, level = spec.partition(":")
    factory = CODECS.get(name)
    if factory is None:
        raise ValueError(f"unknown codec {spec!r}; known: {', '.join(sorted(CODECS))}")
    try:
        return factory(int(level) if level else None)
    except ValueError as exc:
        raise ValueError(f"bad codec level in {spec!r}: {exc}") from None


def choose_array_codec(dtype: np.dtype[Any]) -> str:
    """The default codec of a numeric array field of ``dtype``."""
    if dtype.kind == "f" or dtype.kind == "c":
        return "blosc-lz4"
    if dtype.itemsize == 1:
        return "blosc-zstd-bitshuffle"
    return "blosc-zstd"


def choose_bytes_codec(values: Sequence[bytes], *, min_gain: float = 1.1) -> str:
    """``"zstd"`` if it shrinks a probe of ``values`` by ``min_gain``, else ``"none"``."""
    probe, total = [], 0
    for value in values:
        probe.append(value)
        total += len(value)
        if total >= 1 << 20 or len(probe) >= 256:
            break
    if total == 0:
        return "none"
    codec = numcodecs.Zstd(level=1)
    packed = sum(len(codec.encode(v)) for v in probe)
    return "zstd" if total >= min_gain * packed else "none"
