"""``iosvc stage``: make a verified replica of a dataset appear at a site.

The order of steps makes a crash at any point safe to retry:

1. claim the destination replica (``transferring``) in the catalog; a replica another live
   stage is working on is refused, one whose stage stopped updating is taken over;
2. record the task and the backend's submission id **before** submitting; a retry after a crash
   between submit and record reuses that id, so Globus finds the first task instead of
   starting a second one;
3. submit, record the task id, follow progress (the catalog is updated about once a second, so
   ``iosvc stage status`` in another shell sees it, and ``iosvc stage cancel`` reaches it);
4. verify the destination against the manifest and only then mark the replica ``verified``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iosvc.errors import (
    Cancelled,
    DataCorruption,
    InvalidArgument,
    IosvcError,
    NotFound,
    TransferFailed,
)
from iosvc.staging._backend import Endpoint, TaskStatus, TransferBackend, TransferRequest
from iosvc.staging._catalog import (
    Catalog,
    DatasetRecord,
    ReplicaRecord,
    TaskRecord,
    owner_alive,
)
from iosvc.staging._fsspec_backend import FsspecBackend
from iosvc.staging._manifest import build_manifest, verify
from iosvc.staging._sites import Site, Sites

__all__ = [
    "BUFFER_SUFFIX",
    "DEFAULT_BUFFER",
    "StageResult",
    "Stager",
    "TransferFailed",
    "TransferInProgress",
]

#: Where ``--into-buffer`` stages when a site names no ``buffer``.
DEFAULT_BUFFER = "iosvc:///datasets"
#: A site's burst buffer is recorded as the replica site ``<site>:buffer``.
BUFFER_SUFFIX = ":buffer"
#: A transferring replica whose task has not been updated for this long is abandoned.
STALE_AFTER = 60.0
_UPDATE_EVERY = 0.5

Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)


class TransferInProgress(IosvcError, RuntimeError):
    """Another live ``iosvc stage`` is already staging this replica."""

    grpc_code = "ABORTED"


@dataclass(frozen=True, slots=True)
class StageResult:
    """The outcome of :meth:`Stager.stage`."""

    dataset: str
    version: int
    site: str
    path: str
    url: str
    state: str
    task: int | None
    bytes_copied: int
    files_copied: int
    files_skipped: int
    detail: str
    seconds: float


class Stager:
    """Registers datasets and stages replicas, with a catalog and the sites it knows.

    Parameters
    ----------
    catalog, sites
        Where state is kept and what sites exist.
    globus_backend
        Makes the Globus backend when a transfer needs it (default: a ``GlobusBackend``
        over ``make_transfer_client()``, imported only then).
    threads
        Parallelism of the fsspec backend and of verification.
    verify
        ``"full"`` (default): after the transfer, read every file back at the destination and
        compare it with the manifest. ``"transfer"``: for fsspec transfers, trust the copy's
        own checks instead (every byte it wrote was hashed against the manifest as it was read,
        and files it skipped were read back and matched); Globus transfers are always read
        back when the destination is reachable.
    """

    def __init__(
        self,
        catalog: Catalog,
        sites: Sites,
        *,
        globus_backend: Callable[[Site, Site], TransferBackend] | None = None,
        threads: int = 8,
        verify: str = "full",
    ) -> None:
        if verify not in ("full", "transfer"):
            raise InvalidArgument(f"verify must be 'full' or 'transfer', not {verify!r}")
        self.catalog = catalog
        self.sites = sites
        self.threads = threads
        self.verify_mode = verify
        self._globus_factory = globus_backend

    # -- registration -----------------------------------------------------------------------

    def register(
        self, path: str, *, name: str, site: str, on_progress: Progress | None = None
    ) -> DatasetRecord:
        """Record the files under ``site``'s root + ``path`` as dataset ``name``.

        A manifest different from the latest version's makes a new version.
        """
        where = self.sites[site]
        url = where.replica_url(path)
        total = [0]

        def progress(nbytes: int, nfiles: int) -> None:
            total[0] += nbytes
            if on_progress is not None:
                on_progress("checksum", total[0], 0)

        files = build_manifest(url, threads=self.threads, on_progress=progress)
        record = self.catalog.add_dataset(name, files)
        self.catalog.add_replica_unique(name, record.version, site, path.strip("/"))
        return record

    # -- staging ----------------------------------------------------------------------------

    def stage(
        self,
        name: str,
        *,
        to: str,
        source: str | None = None,
        path: str | None = None,
        into_buffer: bool = False,
        version: int | None = None,
        on_progress: Progress | None = None,
        wait: bool = True,
    ) -> list[StageResult]:
        """Make a verified replica of ``name`` at site ``to`` (and in its burst buffer).

        Returns one result per replica produced (two with ``into_buffer``). With
        ``wait=False`` a Globus transfer is submitted and left running (state
        ``transferring``); :meth:`refresh` verifies the replica once Globus reports success.
        fsspec transfers run in this process and are always waited for, and so is a Globus
        transfer followed by ``into_buffer`` (the buffer is filled from the new replica).
        """
        dataset = self.catalog.dataset(name, version)
        destination = self.sites[to]
        results = [
            self._stage_one(
                dataset, destination, to, source, path, on_progress, wait=wait or into_buffer
            )
        ]
        if into_buffer:
            buffer = self._site_of(to + BUFFER_SUFFIX)
            results.append(
                self._stage_one(
                    dataset,
                    buffer,
                    to + BUFFER_SUFFIX,
                    to,
                    name,
                    on_progress,
                    source_site=destination,
                )
            )
        return results

    def _source(self, dataset: DatasetRecord, to: str, source: str | None) -> ReplicaRecord:
        replicas = self.catalog.replicas(dataset.name, dataset.version)
        verified = [r for r in replicas if r.state == "verified" and r.site != to]
        if source is not None:
            verified = [r for r in verified if r.site == source]
        if not verified:
            where = ", ".join(f"{r.site} ({r.state})" for r in replicas) or "none"
            wanted = f" at {source}" if source else ""
            raise NotFound(
                f"no verified replica of {dataset.name} v{dataset.version}{wanted} to copy "
                f"from (replicas: {where})"
            )
        # A real site before a burst buffer: the buffer is the faster source only on its own site.
        verified.sort(key=lambda r: (r.site.endswith(BUFFER_SUFFIX), r.site))
        return verified[0]

    def _site_of(self, replica_site: str) -> Site:
        if replica_site.endswith(BUFFER_SUFFIX):
            owner = self.sites[replica_site[: -len(BUFFER_SUFFIX)]]
            return Site(name=replica_site.replace(":", "-"), url=owner.buffer or DEFAULT_BUFFER)
        return self.sites[replica_site]

    def _stage_one(
        self,
        dataset: DatasetRecord,
        destination: Site,
        replica_site: str,
        source: str | None,
        path: str | None,
        on_progress: Progress | None,
        *,
        source_site: Site | None = None,
        wait: bool = True,
    ) -> StageResult:
        started = time.monotonic()
        src_replica = self._source(dataset, replica_site, source)
        src_site = source_site if source_site is not None else self._site_of(src_replica.site)
        dst_path = (path if path is not None else src_replica.path).strip("/")
        dst_url = destination.replica_url(dst_path)
        src_url = src_site.replica_url(src_replica.path)
        self._claim(dataset, replica_site, dst_path)
        backend: TransferBackend
        if src_site.uses_globus and destination.uses_globus:
            backend = self._globus(src_site, destination)
        else:
            # Cancels reach it through _run's progress callback (catalog on this thread).
            backend = FsspecBackend(threads=self.threads)
        request = TransferRequest(
            dataset=dataset.name,
            version=dataset.version,
            source=Endpoint(
                src_site.name,
                src_url,
                src_site.globus_collection,
                src_site.globus_replica_path(src_replica.path) if src_site.uses_globus else None,
            ),
            destination=Endpoint(
                destination.name,
                dst_url,
                destination.globus_collection,
                destination.globus_replica_path(dst_path) if destination.uses_globus else None,
            ),
            files=dataset.files,
            label=f"iosvc stage {dataset.name} v{dataset.version} to {replica_site}",
        )
        number = self._task_for(dataset, src_replica.site, replica_site, backend)
        try:
            status = self._run(number, backend, request, on_progress, wait=wait)
        except BaseException as exc:
            state = "canceled" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "failed"
            self.catalog.update_task(number, state=state, error=f"{type(exc).__name__}: {exc}")
            self.catalog.set_replica(
                dataset.name, dataset.version, replica_site, dst_path, "failed", str(exc)
            )
            raise
        if status.state == "active":  # submitted, not waited for
            return StageResult(
                dataset.name,
                dataset.version,
                replica_site,
                dst_path,
                dst_url,
                "transferring",
                number,
                0,
                0,
                0,
                f"{backend.name} task {status.task_id} submitted; follow it with "
                f"`iosvc stage status {number}` (it verifies the replica when the task is done)",
                time.monotonic() - started,
            )
        if status.state != "succeeded":
            detail = status.error or status.state
            self.catalog.update_task(number, state=status.state, error=detail)
            self.catalog.set_replica(
                dataset.name, dataset.version, replica_site, dst_path, "failed", detail
            )
            if status.state == "canceled":
                raise Cancelled(f"task {number} was cancelled")
            raise TransferFailed(
                f"staging {dataset.name} to {replica_site} failed (task {number}): {detail}"
            )
        self.catalog.update_task(
            number,
            state="succeeded",
            bytes_done=status.bytes_done,
            files_done=status.files_done,
        )
        if self.verify_mode == "transfer" and backend.name == "fsspec":
            detail = (
                f"verified in transfer ({status.files_done - status.files_skipped} files hashed "
                f"as copied, {status.files_skipped} read back)"
            )
            self.catalog.set_replica(
                dataset.name, dataset.version, replica_site, dst_path, "verified", detail
            )
        else:
            detail = self._verify(dataset, replica_site, dst_path, dst_url, backend, on_progress)
        if status.note:
            detail = f"{detail}; {status.note}"
        return StageResult(
            dataset.name,
            dataset.version,
            replica_site,
            dst_path,
            dst_url,
            "verified",
            number,
            status.bytes_done - status.bytes_skipped,
            status.files_done - status.files_skipped,
            status.files_skipped,
            detail,
            time.monotonic() - started,
        )

    def _claim(self, dataset: DatasetRecord, site: str, path: str) -> None:
        live = self.catalog.claim_replica(
            dataset.name, dataset.version, site, path, stale_after=STALE_AFTER
        )
        if live is not None:
            raise TransferInProgress(
                f"{dataset.name} v{dataset.version} is being staged to {site} by task {live}; "
                f"follow it with `iosvc stage status {live}`"
            )

    def _task_for(
        self, dataset: DatasetRecord, source: str, destination: str, backend: TransferBackend
    ) -> int:
        # A task of the same route left 'submitting' by a crash keeps its submission id.
        for task in self.catalog.tasks(dataset.name):
            if (
                task.version == dataset.version
                and (task.source, task.destination, task.backend)
                == (source, destination, backend.name)
                and task.state == "submitting"
                and task.submission_id
            ):
                return task.id
        return self.catalog.add_task(
            dataset.name,
            dataset.version,
            source,
            destination,
            backend.name,
            bytes_total=dataset.total_bytes,
            files_total=len(dataset.files),
        )

    def _run(
        self,
        number: int,
        backend: TransferBackend,
        request: TransferRequest,
        on_progress: Progress | None,
        *,
        wait: bool = True,
    ) -> TaskStatus:
        task = self.catalog.task(number)
        submission_id = task.submission_id
        if not submission_id:
            submission_id = backend.new_submission_id(request)
            self.catalog.update_task(number, submission_id=submission_id)
        task_id = backend.submit(request, submission_id)
        self.catalog.update_task(number, task_id=task_id, state="active")
        if not wait and backend.name != "fsspec":
            return TaskStatus(task_id, "active", bytes_total=request.total_bytes)
        last = [0.0]

        def progress(status: TaskStatus) -> None:
            now = time.monotonic()
            if on_progress is not None:
                on_progress("copy", status.bytes_done, status.bytes_total)
            if now - last[0] >= _UPDATE_EVERY or status.finished:
                last[0] = now
                self.catalog.update_task(
                    number, bytes_done=status.bytes_done, files_done=status.files_done
                )
                if not status.finished and self._cancel_requested_number(number):
                    backend.cancel(task_id)

        return backend.wait(task_id, on_progress=progress)

    def _cancel_requested_number(self, number: int) -> bool:
        return self.catalog.task(number).state == "canceling"

    def _verify(
        self,
        dataset: DatasetRecord,
        site: str,
        path: str,
        url: str,
        backend: TransferBackend,
        on_progress: Progress | None,
    ) -> str:
        done = [0]

        def progress(nbytes: int, nfiles: int) -> None:
            done[0] += nbytes
            if on_progress is not None:
                on_progress("verify", done[0], dataset.total_bytes)

        try:
            report = verify(url, dataset.files, threads=self.threads, on_progress=progress)
        except (OSError, ValueError, ImportError) as exc:
            if backend.name != "globus":
                raise
            # The site is not reachable from here: Globus compared checksums end to end.
            detail = f"verified by Globus checksums (not readable from here: {exc})"
            self.catalog.set_replica(dataset.name, dataset.version, site, path, "verified", detail)
            return detail
        if not report.ok:
            detail = f"verification failed: {report.summary()}"
            self.catalog.set_replica(dataset.name, dataset.version, site, path, "failed", detail)
            raise DataCorruption(f"{dataset.name} at {site}: {detail}")
        self.catalog.set_replica(dataset.name, dataset.version, site, path, "verified")
        return f"verified {report.checked} files"

    def check(self, name: str, site: str, *, version: int | None = None) -> str:
        """Re-verify a replica; mark it ``verified`` or ``stale`` (files changed since)."""
        dataset = self.catalog.dataset(name, version)
        replica = self.catalog.replica(dataset.name, dataset.version, site)
        if replica is None:
            raise NotFound(f"{name} v{dataset.version} has no replica at {site}")
        where = self._site_of(site)
        url = where.replica_url(replica.path)
        report = verify(url, dataset.files, threads=self.threads)
        state = "verified" if report.ok else "stale"
        error = None if report.ok else report.summary()
        self.catalog.set_replica(name, dataset.version, site, replica.path, state, error)
        return report.summary()

    # -- tasks ------------------------------------------------------------------------------

    def refresh(self, number: int) -> TaskRecord:
        """A task's state; a running Globus task is asked for its progress first."""
        task = self.catalog.task(number)
        if task.backend == "globus" and task.task_id and not task.finished_state:
            backend = self._globus(self._site_of(task.source), self._site_of(task.destination))
            status = backend.status(task.task_id)
            fields: dict[str, Any] = {
                "bytes_done": status.bytes_done,
                "files_done": status.files_done,
            }
            if status.finished:
                fields["state"] = status.state
                fields["error"] = status.error
            self.catalog.update_task(number, **fields)
            task = self.catalog.task(number)
            replica = self.catalog.replica(task.name, task.version, task.destination)
            if status.finished and replica is not None and replica.state == "transferring":
                # A transfer submitted without --wait: verify its replica now that it is done.
                if status.state == "succeeded":
                    dataset = self.catalog.dataset(task.name, task.version)
                    url = self._site_of(task.destination).replica_url(replica.path)
                    # On a mismatch _verify marks the replica failed with what it found.
                    with contextlib.suppress(DataCorruption):
                        self._verify(dataset, task.destination, replica.path, url, backend, None)
                else:
                    self.catalog.set_replica(
                        task.name,
                        task.version,
                        task.destination,
                        replica.path,
                        "failed",
                        status.error or status.state,
                    )
        return task

    def cancel(self, number: int, *, wait: float = 10.0) -> TaskRecord:
        """Cancel a task: Globus tasks directly, fsspec ones through their stage process."""
        task = self.catalog.task(number)
        if task.finished_state:
            raise InvalidArgument(f"task {number} already {task.state}")
        if task.backend == "globus" and task.task_id:
            backend = self._globus(self._site_of(task.source), self._site_of(task.destination))
            backend.cancel(task.task_id)
            self.catalog.update_task(number, state="canceled", error="cancelled by user")
        else:
            self.catalog.request_cancel(number)
            deadline = time.monotonic() + (wait if owner_alive(task.owner) else 0.0)
            while time.monotonic() < deadline:
                task = self.catalog.task(number)
                if task.finished_state:
                    break
                time.sleep(0.1)
            else:
                # Its stage process is gone (or stuck): nothing else will finish the record.
                self.catalog.update_task(
                    number, state="canceled", error="cancelled; its stage process did not answer"
                )
        task = self.catalog.task(number)
        replica = self.catalog.replica(task.name, task.version, task.destination)
        if replica is not None and replica.state == "transferring":
            self.catalog.set_replica(
                task.name, task.version, task.destination, replica.path, "failed", "cancelled"
            )
        return task

    def _globus(self, source: Site, destination: Site) -> TransferBackend:
        if self._globus_factory is not None:
            return self._globus_factory(source, destination)
        try:
            from iosvc.staging._globus import GlobusBackend, make_transfer_client
        except ImportError as exc:
            raise InvalidArgument(
                f"sites {source.name} and {destination.name} use Globus, but the Globus backend "
                f"cannot load ({exc}); install iosvc[globus]"
            ) from None
        collections = [c for c in (source.globus_collection, destination.globus_collection) if c]
        backend: TransferBackend = GlobusBackend(make_transfer_client(collections))
        return backend
