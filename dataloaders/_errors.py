"""The errors of ``dataloaders``.

::

    ShardError
    ├── ShardNotFound        (FileNotFoundError)   a shard (or the manifest) is missing
    ├── ShardCorrupted       (OSError, EIO)        a shard's bytes fail their checksum / size
    └── ManifestError        (ValueError)          the manifest is unreadable or inconsistent

Every message names the shard and the URL it came from, so a failing job points at the file.
"""

from __future__ import annotations

import errno

__all__ = ["ManifestError", "ShardCorrupted", "ShardError", "ShardNotFound"]


class ShardError(Exception):
    """Root of the errors raised by ``dataloaders``."""


class ShardNotFound(ShardError, FileNotFoundError):
    """A shard file listed in the manifest (or the manifest itself) does not exist."""


class ShardCorrupted(ShardError, OSError):
    """A shard file's size or xxh3 checksum differs from the manifest's."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ManifestError(ShardError, ValueError):
    """The manifest cannot be parsed, or does not describe a dataset this version reads."""
