"""Sites: where datasets live, from ``sites.toml``.

::

    [sites.frontier]
    url = "file:///lustre/orion/datasets"          # fsspec URL of the site's dataset root
    globus_collection = "6b1c...-uuid"             # optional: reached with Globus
    globus_path = "/lustre/orion/datasets"         # root inside the collection
    buffer = "iosvc:///datasets"                   # optional: the site's burst buffer

Found at ``$IOSVC_SITES`` or ``~/.iosvc/sites.toml``; read when asked, never at import.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iosvc.errors import InvalidArgument, NotFound

__all__ = ["Site", "Sites", "default_sites_file", "join_url", "load_sites"]

_FIELDS = ("url", "globus_collection", "globus_path", "buffer")


def default_sites_file() -> Path:
    """``$IOSVC_SITES`` if set, else ``~/.iosvc/sites.toml``."""
    env = os.environ.get("IOSVC_SITES")
    return Path(env) if env else Path.home() / ".iosvc" / "sites.toml"


def join_url(base: str, path: str) -> str:
    """``base`` + ``/`` + ``path`` without doubled or trailing slashes (``path`` may be empty)."""
    path = path.strip("/")
    if not path:
        return base.rstrip("/") if base.rstrip("/") else base
    return f"{base.rstrip('/')}/{path}"


@dataclass(frozen=True, slots=True)
class Site:
    """One site of ``sites.toml``.

    Parameters
    ----------
    name
        The table name (``[sites.NAME]``).
    url
        fsspec URL of the site's dataset root; replicas live at ``url/<path>``.
    globus_collection
        Globus collection UUID; a site that has one is reached with Globus.
    globus_path
        Absolute path of the dataset root inside the collection (default ``/``).
    buffer
        fsspec URL (usually ``iosvc:///datasets``) where ``--into-buffer`` stages to.
    """

    name: str
    url: str
    globus_collection: str | None = None
    globus_path: str | None = None
    buffer: str | None = None

    def __post_init__(self) -> None:
        where = f"sites.{self.name}"
        if not self.name or "/" in self.name:
            raise InvalidArgument(f"site name {self.name!r}: must be non-empty, without '/'")
        if not isinstance(self.url, str) or not self.url:
            raise InvalidArgument(f"{where}.url: an fsspec URL is required")
        if self.globus_collection is not None:
            try:
                uuid.UUID(str(self.globus_collection))
            except ValueError:
                raise InvalidArgument(
                    f"{where}.globus_collection: {self.globus_collection!r} is not a UUID"
                ) from None
        if self.globus_path is not None and not str(self.globus_path).startswith("/"):
            raise InvalidArgument(
                f"{where}.globus_path: must be absolute, got {self.globus_path!r}"
            )

    @property
    def uses_globus(self) -> bool:
        return self.globus_collection is not None

    def replica_url(self, path: str) -> str:
        """fsspec URL of a replica at ``path`` (relative to the site's root)."""
        return join_url(self.url, path)

    def globus_replica_path(self, path: str) -> str:
        """Path of a replica inside the site's Globus collection."""
        return join_url(self.globus_path or "/", path) or "/"


@dataclass(frozen=True, slots=True)
class Sites:
    """The sites of one ``sites.toml``, by name."""

    sites: Mapping[str, Site]
    source: str = "<memory>"

    def __getitem__(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            known = ", ".join(sorted(self.sites)) or "none"
            raise NotFound(
                f"unknown site {name!r} (known sites in {self.source}: {known})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.sites

    def __iter__(self) -> Any:
        return iter(self.sites.values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<memory>") -> Sites:
        """Build from the parsed TOML document (``{"sites": {name: {...}}}``)."""
        tables = data.get("sites")
        if not isinstance(tables, Mapping) or not tables:
            raise InvalidArgument(f"{source}: no [sites.NAME] tables")
        sites = {}
        for name, table in tables.items():
            if not isinstance(table, Mapping):
                raise InvalidArgument(f"{source}: sites.{name} must be a table")
            unknown = sorted(set(table) - set(_FIELDS))
            if unknown:
                raise InvalidArgument(
                    f"{source}: sites.{name}: unknown field(s) {', '.join(unknown)} "
                    f"(known: {', '.join(_FIELDS)})"
                )
            if "url" not in table:
                raise InvalidArgument(f"{source}: sites.{name}.url: an fsspec URL is required")
            sites[name] = Site(name=name, **{k: table[k] for k in _FIELDS if k in table})
        return cls(sites, source)


def load_sites(path: str | os.PathLike[str] | None = None) -> Sites:
    """Read ``sites.toml`` (``path``, ``$IOSVC_SITES`` or ``~/.iosvc/sites.toml``).

    Raises
    ------
    NotFound
        If the file does not exist (the message says where it was looked for).
    InvalidArgument
        If it is not valid TOML or a site is malformed.
    """
    file = Path(path) if path is not None else default_sites_file()
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise NotFound(
            f"no sites file at {file}: create it with one [sites.NAME] table per site "
            "(url = ..., optional globus_collection, globus_path, buffer) or set IOSVC_SITES"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{file}: {exc}") from None
    return Sites.from_dict(data, str(file))
