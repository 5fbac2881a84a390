"""The fsspec transfer backend: copies between any two fsspec URLs, in this process.

Parallel (a thread pool over batches: small files read with one ``cat`` and written with one
``pipe`` per batch, large files streamed in 8 MiB blocks), checksum-checked (every byte read
from the source is hashed and compared with the manifest before it is written, so a corrupt
source never becomes a "verified" replica), and resumable: files already at the destination
with the right size and checksum are skipped, so a stage that was interrupted, or a stage to a
site whose replica has rotted, copies only what is missing or wrong.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import fsspec
import xxhash
from fsspec.asyn import sync

from iosvc.errors import Cancelled, DataCorruption
from iosvc.staging._backend import FileEntry, TaskStatus, TransferRequest
from iosvc.staging._manifest import (
    ALGORITHM,
    BLOCK,
    SMALL_FILE,
    batches,
    checksum,
    list_files,
    open_url,
    read_many,
    verify,
)

__all__ = ["CopyResult", "FsspecBackend", "copy_files"]


@dataclass(slots=True)
class CopyResult:
    """What one copy did."""

    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    bytes_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    #: files the destination's iosvc servers read from the source themselves
    pulled: int = 0


def _mkdirs(fs: fsspec.AbstractFileSystem, root: str, files: Sequence[FileEntry]) -> None:
    # Local filesystems need parents to exist; object stores and iosvc do not care.
    parents = {posixpath.dirname(posixpath.join(root, f.path)) for f in files}
    for parent in sorted(parents):
        fs.makedirs(parent, exist_ok=True)


class _Sink:
    """Where a large file's blocks go: an iosvc writer directly, else an fsspec file.

    For ``iosvc://`` the client's streaming writer takes the blocks as they are (fsspec's
    buffered file would copy each block into its own buffer first); nothing is visible until
    ``commit``, and ``abort`` frees what was sent.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        from iosvc.client import IosvcFileSystem

        self._fs, self._path = fs, path
        self._writer = None
        self._file = None
        if isinstance(fs, IosvcFileSystem):
            self._writer = fs.client.open_writer(fs._strip_protocol(path))
        else:
            self._file = fs.open(path, "wb")

    def write(self, block: bytes) -> None:
        if self._writer is not None:
            sync(self._fs.loop, self._writer.write, block)
        else:
            assert self._file is not None
            self._file.write(block)

    def commit(self) -> None:
        if self._writer is not None:
            sync(self._fs.loop, self._writer.close)
        else:
            assert self._file is not None
            self._file.close()

    def abort(self) -> None:
        if self._writer is not None:
            sync(self._fs.loop, self._writer.abort)
            return
        assert self._file is not None
        self._file.close()
        with contextlib.suppress(OSError):
            self._fs.rm(self._path)  # a local partial file is removed


def _copy_large(
    src: fsspec.AbstractFileSystem,
    dst: fsspec.AbstractFileSystem,
    src_path: str,
    dst_path: str,
    entry: FileEntry,
    on_bytes: Callable[[int], None],
) -> None:
    digest = xxhash.xxh3_128()
    with src.open(src_path, "rb", block_size=BLOCK) as fin:
        sink = _Sink(dst, dst_path)
        try:
            while block := fin.read(BLOCK):
                digest.update(block)
                sink.write(block)
                on_bytes(len(block))
            got = f"{ALGORITHM}:{digest.hexdigest()}"
            if got != entry.checksum:
                raise DataCorruption(
                    f"source file {entry.path} does not match its manifest "
                    f"({got} != {entry.checksum}); not copied"
                )
        except BaseException:
            sink.abort()
            raise
        sink.commit()


def _pull_into_iosvc(
    src: fsspec.AbstractFileSystem,
    src_root: str,
    dst: fsspec.AbstractFileSystem,
    dst_root: str,
    files: Sequence[FileEntry],
    result: CopyResult,
    progress: Callable[[int, int], None],
    cancelled: Callable[[], bool] | None,
) -> list[FileEntry]:
    """Stage local files into iosvc with server-side reads; return the files left to copy.

    When the iosvc servers mount the source (the parallel file system, or this machine for a
    local cluster) and allow it (``--pull-root``), each server reads its own chunks: the data
    never passes through this process. Every file is still read here once and hashed against
    the manifest before it is committed, and the servers check every chunk they read against
    this process's checksums. Files that cannot be pulled (servers that do not see the
    source, or read it differently) are returned to be copied the ordinary way.
    """
    from fsspec.implementations.local import LocalFileSystem

    from iosvc.client import IosvcFileSystem
    from iosvc.placement import normalize_path

    if not files or not isinstance(dst, IosvcFileSystem) or not isinstance(src, LocalFileSystem):
        return list(files)
    client = dst.client
    first = posixpath.join(src_root, files[0].path)
    if sync(dst.loop, client.pull_probe, first) is not None:
        return list(files)  # pulling is off, or the servers do not see this file system
    by_dest = {normalize_path(posixpath.join(dst_root, f.path)): f for f in files}
    mismatched: set[str] = set()

    def accept(dest: str, digest: Any) -> None:
        entry = by_dest[dest]
        got = f"{ALGORITHM}:{digest.hexdigest()}"
        if got != entry.checksum:
            mismatched.add(dest)
            raise DataCorruption(
                f"source file {entry.path} does not match its manifest ({got} != "
                f"{entry.checksum}); not copied"
            )

    def done(dest: str, size: int) -> None:
        result.copied += 1
        result.pulled += 1
        result.bytes_copied += size
        progress(size, 1)

    pairs = [(posixpath.join(src_root, f.path), dest) for dest, f in by_dest.items()]
    failed = sync(
        dst.loop,
        client.pull_files,
        pairs,
        hasher=xxhash.xxh3_128,
        accept=accept,
        on_done=done,
        cancelled=cancelled,
    )
    retry = []
    for dest, exc in failed.items():
        if dest in mismatched:
            result.failed[by_dest[dest].path] = str(exc)
        else:
            retry.append(by_dest[dest])
    return retry


def copy_files(
    source_url: str,
    destination_url: str,
    files: Sequence[FileEntry],
    *,
    threads: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> CopyResult:
    """Copy ``files`` from ``source_url`` to ``destination_url`` (same relative paths).

    Files present at the destination with the right size are checksummed and skipped when
    they match. Errors are collected per file (``CopyResult.failed``), not raised, so one bad
    file does not stop the others; a cancel raises :class:`~iosvc.errors.Cancelled`.
    """
    src, src_root = open_url(source_url)
    dst, dst_root = open_url(destination_url)
    result = CopyResult()
    lock = threading.Lock()

    def progress(nbytes: int, nfiles: int) -> None:
        if on_progress is not None:
            with lock:
                on_progress(nbytes, nfiles)

    present = list_files(dst, dst_root)
    maybe_done = [f for f in files if present.get(f.path) == f.size]
    to_copy = [f for f in files if present.get(f.path) != f.size]
    if maybe_done:
        report = verify(destination_url, maybe_done, threads=threads)
        good = set(e.path for e in maybe_done) - set(report.bad)
        result.skipped = len(good)
        result.bytes_skipped = sum(f.size for f in maybe_done if f.path in good)
        progress(result.bytes_skipped, len(good))
        to_copy += [f for f in maybe_done if f.path not in good]
    to_copy = _pull_into_iosvc(src, src_root, dst, dst_root, to_copy, result, progress, cancelled)
    if not to_copy:
        return result
    _mkdirs(dst, dst_root, to_copy)

    def run(group: list[FileEntry]) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled("transfer cancelled")
        if len(group) == 1 and group[0].size > SMALL_FILE:
            entry = group[0]
            try:
                _copy_large(
                    src,
                    dst,
                    posixpath.join(src_root, entry.path),
                    posixpath.join(dst_root, entry.path),
                    entry,
                    lambda n: progress(n, 0),
                )
            except Cancelled:
                raise
            except Exception as exc:
                with lock:
                    result.failed[entry.path] = str(exc)
                return
            with lock:
                result.copied += 1
                result.bytes_copied += entry.size
            progress(0, 1)
            return
        paths = [posixpath.join(src_root, e.path) for e in group]
        data = read_many(src, paths)
        out = {}
        failed = {}
        for entry, path in zip(group, paths, strict=True):
            blob = data.get(path)
            if isinstance(blob, Exception) or blob is None:
                failed[entry.path] = f"cannot read source: {blob}"
            elif len(blob) != entry.size or checksum(blob) != entry.checksum:
                failed[entry.path] = "source file does not match its manifest; not copied"
            else:
                out[posixpath.join(dst_root, entry.path)] = blob
        if out:
            try:
                dst.pipe(out)
            except Exception as exc:
                failed.update({posixpath.relpath(p, dst_root): str(exc) for p in out})
                out = {}
        with lock:
            result.failed.update(failed)
            result.copied += len(out)
            result.bytes_copied += sum(len(b) for b in out.values())
        progress(sum(len(b) for b in out.values()), len(out))

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run, group) for group in batches(to_copy)]
        try:
            for future in futures:
                future.result()
        except Cancelled:
            for future in futures:
                future.cancel()
            raise
    return result


class FsspecBackend:
    """Copies in this process with :func:`copy_files`; ``submit`` runs it on a thread.

    Parameters
    ----------
    threads
        Parallel batches.
    cancelled
        Asked between batches with the task id; True stops the copy (``iosvc stage cancel``
        from another process sets the catalog state this reads).
    """

    name: ClassVar[str] = "fsspec"

    def __init__(self, *, threads: int = 8, cancelled: Callable[[str], bool] | None = None) -> None:
        self.threads = threads
        self._cancelled = cancelled
        self._tasks: dict[str, TaskStatus] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def new_submission_id(self, request: TransferRequest) -> str:
        return uuid.uuid4().hex

    def submit(self, request: TransferRequest, submission_id: str) -> str:
        task_id = submission_id  # resubmitting the same id finds the same task
        with self._lock:
            if task_id in self._tasks:
                return task_id
            status = TaskStatus(
                task_id,
                "active",
                bytes_total=request.total_bytes,
                files_total=len(request.files),
            )
            self._tasks[task_id] = status

        def progress(nbytes: int, nfiles: int) -> None:
            status.bytes_done += nbytes
            status.files_done += nfiles

        def cancelled() -> bool:
            if status.state == "canceled":
                return True
            return self._cancelled is not None and self._cancelled(task_id)

        def run() -> None:
            try:
                result = copy_files(
                    request.source.url,
                    request.destination.url,
                    request.files,
                    threads=self.threads,
                    on_progress=progress,
                    cancelled=cancelled,
                )
            except Cancelled:
                status.state = "canceled"
                return
            except Exception as exc:
                status.state, status.error = "failed", f"{type(exc).__name__}: {exc}"
                return
            status.files_skipped = result.skipped
            status.bytes_skipped = result.bytes_skipped
            if result.pulled:
                status.note = f"{result.pulled} files read by the buffer's servers themselves"
            if result.failed:
                status.state = "failed"
                status.events = [f"{p}: {e}" for p, e in sorted(result.failed.items())]
                status.error = f"{len(result.failed)} file(s) failed: " + "; ".join(
                    status.events[:3]
                )
            else:
                status.state = "succeeded"

        thread = threading.Thread(target=run, name=f"iosvc-stage-{task_id[:8]}", daemon=True)
        self._threads[task_id] = thread
        thread.start()
        return task_id

    def status(self, task_id: str) -> TaskStatus:
        try:
            return self._tasks[task_id]
        except KeyError:
            from iosvc.errors import NotFound

            raise NotFound(
                f"fsspec task {task_id} is not running in this process (it ran in the "
                "`iosvc stage` that started it; the catalog has its last state)"
            ) from None

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[TaskStatus], None] | None = None,
    ) -> TaskStatus:
        status = self.status(task_id)
        thread = self._threads[task_id]
        waited = 0.0
        while thread.is_alive():
            thread.join(0.2)
            waited += 0.2
            if on_progress is not None:
                on_progress(status)
            if timeout is not None and waited >= timeout:
                break
        if on_progress is not None:
            on_progress(status)
        return status

    def cancel(self, task_id: str) -> TaskStatus:
        status = self.status(task_id)
        if not status.finished:
            status.state = "canceled"
            self._threads[task_id].join()
        return status
