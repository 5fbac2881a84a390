"""The dataset catalog: datasets, their replicas per site, and transfer tasks (SQLite).

One file (``$IOSVC_CATALOG`` or ``~/.iosvc/catalog.db``), safe under concurrent CLI use: WAL
journal, a busy timeout, and every read-modify-write in a ``BEGIN IMMEDIATE`` transaction, so
two ``iosvc stage`` commands never both claim the same replica or lose each other's updates.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from iosvc.errors import AlreadyExists, InvalidArgument, NotFound
from iosvc.staging._backend import FileEntry

__all__ = [
    "Catalog",
    "DatasetRecord",
    "ReplicaRecord",
    "TaskRecord",
    "default_catalog_file",
    "owner_alive",
]

ReplicaState = Literal["pending", "transferring", "verified", "failed", "stale"]
REPLICA_STATES = ("pending", "transferring", "verified", "failed", "stale")
TASK_STATES = ("submitting", "active", "canceling", "succeeded", "failed", "canceled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT NOT NULL, version INTEGER NOT NULL, created REAL NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS replicas (
    name TEXT NOT NULL, version INTEGER NOT NULL, site TEXT NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL, updated REAL NOT NULL, error TEXT,
    PRIMARY KEY (name, version, site));
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL,
    source TEXT NOT NULL, destination TEXT NOT NULL, backend TEXT NOT NULL,
    submission_id TEXT, task_id TEXT, state TEXT NOT NULL,
    bytes_total INTEGER NOT NULL DEFAULT 0, bytes_done INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0, files_done INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL, updated REAL NOT NULL, finished REAL, error TEXT,
    owner TEXT);
"""


def default_catalog_file() -> Path:
    """``$IOSVC_CATALOG`` if set, else ``~/.iosvc/catalog.db``."""
    env = os.environ.get("IOSVC_CATALOG")
    return Path(env) if env else Path.home() / ".iosvc" / "catalog.db"


@dataclass(frozen=True, slots=True)
class DatasetRecord:
    name: str
    version: int
    created: float
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    name: str
    version: int
    site: str
    path: str
    state: str
    updated: float
    error: str | None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: int
    name: str
    version: int
    source: str
    destination: str
    backend: str
    submission_id: str | None
    task_id: str | None
    state: str
    bytes_total: int
    bytes_done: int
    files_total: int
    files_done: int
    started: float
    updated: float
    finished: float | None
    error: str | None
    owner: str | None = None

    @property
    def finished_state(self) -> bool:
        return self.state in ("succeeded", "failed", "canceled")


class Catalog:
    """Datasets, replicas and transfer tasks in one SQLite file.

    Parameters
    ----------
    path
        The database file (default :func:`default_catalog_file`); created with its parent.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_catalog_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves (IMMEDIATE for writers).
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._write():
            # One statement at a time: executescript() would commit our transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database's write lock up front."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- datasets ---------------------------------------------------------------------------

    def add_dataset(self, name: str, files: Sequence[FileEntry]) -> DatasetRecord:
        """Record a new version of ``name`` (1 for a new dataset) with this manifest.

        The same manifest as the latest version is not a new version: that one is returned.
        """
        _check_name(name)
        manifest = json.dumps([[f.path, f.size, f.checksum] for f in files])
        with self._write() as db:
            row = db.execute(
                "SELECT version, manifest FROM datasets WHERE name = ? ORDER BY version DESC",
                (name,),
            ).fetchone()
            if row is not None and row[1] == manifest:
                version = int(row[0])
            else:
                version = 1 if row is None else int(row[0]) + 1
                db.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?)",
                    (name, version, time.time(), len(files), sum(f.size for f in files), manifest),
                )
        return self.dataset(name, version)

    def dataset(self, name: str, version: int | None = None) -> DatasetRecord:
        """A dataset's manifest (latest version unless ``version``)."""
        query = "SELECT name, version, created, manifest FROM datasets WHERE name = ?"
        args: tuple[Any, ...] = (name,)
        if version is not None:
            query += " AND version = ?"
            args += (version,)
        row = self._db.execute(query + " ORDER BY version DESC", args).fetchone()
        if row is None:
            known = ", ".join(d[0] for d in self.datasets()) or "none"
            what = f"{name!r}" + (f" version {version}" if version is not None else "")
            raise NotFound(f"unknown dataset {what} (registered: {known})")
        files = tuple(FileEntry(p, s, c) for p, s, c in json.loads(row[3]))
        return DatasetRecord(row[0], int(row[1]), float(row[2]), files)

    def datasets(self) -> list[tuple[str, int, int, int]]:
        """(name, latest version, files, bytes) of every dataset."""
        rows = self._db.execute(
            "SELECT name, MAX(version), files, bytes FROM datasets GROUP BY name ORDER BY name"
        ).fetchall()
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    # -- replicas ---------------------------------------------------------------------------

    def set_replica(
        self,
        name: str,
        version: int,
        site: str,
        path: str,
        state: str,
        error: str | None = None,
        *,
        only_from: Sequence[str] | None = None,
    ) -> bool:
        """Create or update a replica's state; with ``only_from``, only if it is in one of them.

        Returns whether the row was written (False: its state was not in ``only_from``).
        """
        if state not in REPLICA_STATES:
            raise InvalidArgument(f"replica state {state!r} (known: {', '.join(REPLICA_STATES)})")
        with self._write() as db:
            row = db.execute(
                "SELECT state FROM replicas WHERE name = ? AND version = ? AND site = ?",
                (name, version, site),
            ).fetchone()
            if only_from is not None and row is not None and row[0] not in only_from:
                return False
            db.execute(
                "INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, version, site, path, state, time.time(), error),
            )
        return True

    def claim_replica(
        self, name: str, version: int, site: str, path: str, *, stale_after: float
    ) -> int | None:
        """Atomically mark a replica ``transferring`` unless a live stage already does.

        Returns None when claimed, or the number of the live task working on it. A replica in
        ``transferring`` whose task has not been updated for ``stale_after`` seconds (its
        stage process died) is taken over.
        """
        with self._write() as db:
            row = db.execute(
                "SELECT state FROM replicas WHERE name = ? AND version = ? AND site = ?",
                (name, version, site),
            ).fetchone()
            if row is not None and row[0] == "transferring":
                live = db.execute(
                    "SELECT id, updated, owner, backend, task_id FROM tasks WHERE name = ? AND "
                    "version = ? AND destination = ? AND state IN ('submitting', 'active', "
                    "'canceling') ORDER BY updated DESC",
                    (name, version, site),
                ).fetchone()
                if live is not None and live[3] == "globus" and live[4]:
                    return int(live[0])  # runs at Globus whether or not its submitter lives
                fresh = live is not None and time.time() - float(live[1]) < stale_after
                if fresh and owner_alive(live[2]):
                    return int(live[0])
            db.execute(
                "INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, version, site, path, "transferring", time.time(), None),
            )
        return None

    def replicas(self, name: str, version: int | None = None) -> list[ReplicaRecord]:
        """Replicas of a dataset (every version unless ``version``)."""
        query = "SELECT * FROM replicas WHERE name = ?"
        args: tuple[Any, ...] = (name,)
        if version is not None:
            query += " AND version = ?"
            args += (version,)
        rows = self._db.execute(query + " ORDER BY version DESC, site", args).fetchall()
        return [ReplicaRecord(r[0], int(r[1]), r[2], r[3], r[4], float(r[5]), r[6]) for r in rows]

    def replica(self, name: str, version: int, site: str) -> ReplicaRecord | None:
        for replica in self.replicas(name, version):
            if replica.site == site:
                return replica
        return None

    # -- tasks ------------------------------------------------------------------------------

    def add_task(
        self,
        name: str,
        version: int,
        source: str,
        destination: str,
        backend: str,
        *,
        bytes_total: int,
        files_total: int,
    ) -> int:
        """Record a transfer about to be submitted; returns the catalog's task number."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO tasks (name, version, source, destination, backend, state, "
                "bytes_total, files_total, started, updated, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    source,
                    destination,
                    backend,
                    "submitting",
                    bytes_total,
                    files_total,
                    now,
                    now,
                    _owner(),
                ),
            )
            assert cursor.lastrowid is not None
            return int(cursor.lastrowid)

    def update_task(self, number: int, **fields: Any) -> None:
        """Set fields of a task (``state``, ``task_id``, ``submission_id``, progress, ``error``)."""
        allowed = {
            "state",
            "task_id",
            "submission_id",
            "bytes_done",
            "files_done",
            "error",
            "bytes_total",
            "files_total",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidArgument(f"unknown task field(s): {', '.join(sorted(unknown))}")
        if "state" in fields and fields["state"] not in TASK_STATES:
            raise InvalidArgument(f"task state {fields['state']!r}")
        now = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields) + ", updated = ?"
        args = [*fields.values(), now]
        if fields.get("state") in ("succeeded", "failed", "canceled"):
            sets += ", finished = ?"
            args.append(now)
        with self._write() as db:
            if db.execute("UPDATE tasks SET " + sets + " WHERE id = ?", (*args, number)).rowcount:
                return
        raise NotFound(f"no task {number} in the catalog")

    def request_cancel(self, number: int) -> TaskRecord:
        """Mark an unfinished task ``canceling`` (its stage process stops it); return it."""
        with self._write() as db:
            db.execute(
                "UPDATE tasks SET state = 'canceling', updated = ? WHERE id = ? "
                "AND state IN ('submitting', 'active')",
                (time.time(), number),
            )
        return self.task(number)

    def task(self, number: int) -> TaskRecord:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (number,)).fetchone()
        if row is None:
            raise NotFound(f"no task {number} in the catalog (see `iosvc stage status`)")
        return _task(row)

    def tasks(self, name: str | None = None, limit: int = 50) -> list[TaskRecord]:
        query, args = "SELECT * FROM tasks", cast(tuple[str, ...], ())
        if name is not None:
            query, args = query + " WHERE name = ?", (name,)
        rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_task(r) for r in rows]

    def add_replica_unique(self, name: str, version: int, site: str, path: str) -> None:
        """Register a replica that must not exist yet (``iosvc datasets register``)."""
        existing = self.replica(name, version, site)
        if existing is not None and existing.path != path:
            raise AlreadyExists(
                f"dataset {name!r} v{version} already has a replica at {site}:{existing.path}"
            )
        self.set_replica(name, version, site, path, "verified")


def _owner() -> str:
    """Who runs a task: ``host:pid`` of this ``iosvc stage`` (a dead one frees its replica)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that owns a task may still run (unknown owners count as alive)."""
    if not owner or ":" not in owner:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: only the staleness timeout can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _task(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        int(row[0]),
        row[1],
        int(row[2]),
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        int(row[9]),
        int(row[10]),
        int(row[11]),
        int(row[12]),
        float(row[13]),
        float(row[14]),
        None if row[15] is None else float(row[15]),
        row[16],
        row[17],
    )


def _check_name(name: str) -> None:
    if not name or not isinstance(name, str) or "/" in name or name.strip() != name:
        raise InvalidArgument(f"dataset name {name!r}: non-empty, no '/', no surrounding spaces")
