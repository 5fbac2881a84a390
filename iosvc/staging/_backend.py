"""Transfer backends: the contract between ``iosvc stage`` and what moves the bytes.

A backend copies the files of one dataset replica from a source site to a destination site.
The stage command (``iosvc/staging/_stage.py``) owns the catalog; backends never touch it. The
order of calls makes submission idempotent across crashes::

    submission_id = backend.new_submission_id(request)   # caller records it in the catalog
    task_id = backend.submit(request, submission_id)     # caller records the task id
    status = backend.wait(task_id, on_progress=...)      # or status() polled by `stage status`

``submit`` called again with a submission id it has already seen returns the same task and
starts nothing new (Globus does this server-side; the fsspec backend skips files already
present and matching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

TaskState = Literal["pending", "active", "succeeded", "failed", "canceled"]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a dataset manifest.

    Parameters
    ----------
    path
        POSIX path relative to the dataset's root (no leading ``/``, no ``..``).
    size
        Size in bytes.
    checksum
        ``"<algorithm>:<hex digest>"``, e.g. ``"xxh3_128:…"``.
    """

    path: str
    size: int
    checksum: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a replica lives: a site and the replica's root on it.

    Parameters
    ----------
    site
        Site name from ``sites.toml``.
    url
        fsspec URL of the replica's root directory (site URL joined with the replica path).
    globus_collection
        Globus collection UUID of the site, if it has one.
    globus_path
        Absolute path of the replica's root inside the Globus collection, if it has one.
    """

    site: str
    url: str
    globus_collection: str | None = None
    globus_path: str | None = None


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """Copy ``files`` from ``source`` to ``destination`` (same relative paths)."""

    dataset: str
    version: int
    source: Endpoint
    destination: Endpoint
    files: Sequence[FileEntry]
    label: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(slots=True)
class TaskStatus:
    """A transfer task as the backend sees it now."""

    task_id: str
    state: TaskState
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    files_skipped: int = 0
    #: bytes of files already at the destination and matching (counted in bytes_done too)
    bytes_skipped: int = 0
    error: str | None = None
    #: human-readable events (errors first) when the task failed or is stuck
    events: list[str] = field(default_factory=list)
    #: how the bytes moved, when worth saying (e.g. read by the buffer's servers themselves)
    note: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "canceled")


class TransferBackend(Protocol):
    """What ``iosvc stage`` needs from a way of moving bytes between sites."""

    #: short name recorded in the catalog ("globus", "fsspec")
    name: ClassVar[str]

    def new_submission_id(self, request: TransferRequest) -> str:
        """A fresh id that makes ``submit`` idempotent; recorded by the caller first."""
        ...

    def submit(self, request: TransferRequest, submission_id: str) -> str:
        """Start (or, for a known ``submission_id``, find) the transfer; return its task id."""
        ...

    def status(self, task_id: str) -> TaskStatus:
        """Current state of a task."""
        ...

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[TaskStatus], None] | None = None,
    ) -> TaskStatus:
        """Block until the task finishes or ``timeout`` passes; report progress on the way."""
        ...

    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a task; returns its state afterwards."""
        ...
