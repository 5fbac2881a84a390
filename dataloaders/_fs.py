"""fsspec helpers: a URL becomes (filesystem, root path); nothing here imports iosvc."""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["is_local", "join", "open_fs", "protocol_of"]


def protocol_of(url: str) -> str:
    """``"file"`` for local paths and ``file://`` URLs, else the URL's scheme."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0] or "file"


def is_local(url: str) -> bool:
    """True when reading ``url`` needs no network client (safe to fork DataLoader workers)."""
    return protocol_of(url) in ("file", "local", "memory")


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path of ``url`` inside it (no trailing slash)."""
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = str(path).rstrip("/")
    if isinstance(fs, LocalFileSystem) and not path:
        path = "/"
    return fs, path


def join(root: str, name: str) -> str:
    return f"{root}/{name}" if root and root != "/" else f"{root}{name}" if root else name
