"""Which nodes form a cluster and which one this is: Slurm node lists and hostfiles.

``iosvc serve --slurm`` (or ``--hostfile FILE``) runs one server per node of an allocation.
Every server must see the same ordered node list (placement depends on it) and know its own
place in it, so that no server has to wait for a coordinator.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from iosvc.errors import InvalidArgument

__all__ = ["expand_hostlist", "nodes_from_slurm", "own_index", "read_hostfile"]

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise InvalidArgument(f"bad host list {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise InvalidArgument(f"bad host list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_one(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise InvalidArgument(f"bad host list {whole!r} at {item!r}")
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    out = []
    for rng in match.group(1).split(","):
        m = _RANGE.match(rng.strip())
        if m is None:
            raise InvalidArgument(f"bad range {rng!r} in host list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise InvalidArgument(f"bad range {rng!r} in host list {whole!r}: end before start")
        if int(hi) - int(lo) > 100_000:
            raise InvalidArgument(f"range {rng!r} in host list {whole!r} is too large")
        width = len(lo)  # nid[001-003] keeps its zero padding
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{prefix}{n:0{width}d}{suffix}", whole))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list: ``nid[001-003,007],login1`` -> ``nid001 nid002 nid003 ...``.

    Raises
    ------
    InvalidArgument
        On unbalanced brackets, bad ranges or an empty list.
    """
    hosts = [h for part in _split_top(text) for h in _expand_one(part, text)]
    if not hosts:
        raise InvalidArgument("empty host list")
    return hosts


def nodes_from_slurm(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The allocation's nodes, in Slurm's order (``SLURM_JOB_NODELIST``)."""
    text = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not text:
        raise InvalidArgument(
            "--slurm needs SLURM_JOB_NODELIST: run `iosvc serve --slurm` inside a Slurm job "
            "(e.g. srun --ntasks-per-node=1 iosvc serve --slurm ...), or give --hostfile"
        )
    return expand_hostlist(text)


def read_hostfile(path: str | os.PathLike[str]) -> list[str]:
    """One host per line (``#`` comments and blank lines ignored; MPI-style ``slots=`` dropped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidArgument(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    hosts = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    if not hosts:
        raise InvalidArgument(f"hostfile {path} lists no hosts")
    if len(set(hosts)) != len(hosts):
        raise InvalidArgument(f"hostfile {path} lists a host twice")
    return hosts


def own_index(
    nodes: list[str],
    *,
    environ: Mapping[str, str] = os.environ,
    hostname: str | None = None,
    address: str | None = None,
) -> int:
    """This node's place in ``nodes``: ``SLURM_NODEID``, else its hostname or bind address."""
    if "SLURM_NODEID" in environ and environ.get("SLURM_JOB_NODELIST"):
        index = int(environ["SLURM_NODEID"])
        if not 0 <= index < len(nodes):
            raise InvalidArgument(f"SLURM_NODEID {index} outside a node list of {len(nodes)}")
        return index
    names = {hostname or socket.gethostname()}
    names.add(names.copy().pop().split(".")[0])
    if address:
        names.add(address)
    for i, node in enumerate(nodes):
        if node in names or node.split(".")[0] in names:
            return i
    raise InvalidArgument(
        f"this node ({', '.join(sorted(names))}) is not in the node list "
        f"({', '.join(nodes[:8])}{'...' if len(nodes) > 8 else ''}); give --index"
    )
