"""``dataloaders.DataLoader``: ``torch.utils.data.DataLoader`` with the right defaults for
:class:`StreamingDataset`, epoch tracking and a ``state_dict`` counted in batches."""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing

# Imported by the first DataLoader that starts workers: here, with the rest of the imports,
# not on the way to the first batch.
import multiprocessing.popen_fork
import multiprocessing.queues
import multiprocessing.synchronize
import sys
from collections.abc import Iterator
from typing import Any

import fsspec
import torch.utils.data

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

from dataloaders._arena import open_batch
from dataloaders._arena import supported as arena_supported
from dataloaders._dataset import StreamingDataset
from dataloaders._fs import is_local, protocol_of
from dataloaders._world import World

__all__ = ["DataLoader", "forks_workers", "grpc_used_before_fork", "widen_result_pipe"]


def _identity(batch: Any) -> Any:
    return batch


def _start_worker(user_init: Any, worker_id: int) -> None:
    """A worker's ``worker_init_fn``: the user's, then :meth:`StreamingDataset.prepare`, so
    the worker plans its epoch and loads its first shards while the loader is still starting
    the other workers, instead of after its first request arrives."""
    if user_init is not None:
        user_init(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, StreamingDataset):
        # A failure here (say, a missing manifest) is met again, and reported as usual, by
        # the iteration, which then plans afresh.
        with contextlib.suppress(Exception):
            info.dataset.prepare()


def grpc_used_before_fork(url: str) -> bool:
    """True if workers forked now could not read ``url`` (so they must be started otherwise).

    gRPC's core does not survive ``fork()`` once it has run; :func:`iosvc.client.fork_safe`
    says whether this process has. It is asked only if iosvc's client is loaded already
    (otherwise no channel can exist), so plain-file users never import it. Local and other
    fsspec URLs fork safely (fsspec restarts its event loop in the child).
    """
    if is_local(url) or protocol_of(url) != "iosvc":
        return False
    module = sys.modules.get("iosvc.client")
    if module is None:
        return False  # iosvc not imported yet: no channel can exist
    return not module.fork_safe()


def _import_filesystem(url: str) -> None:
    """Import the fsspec implementation of ``url`` here, once, before workers fork: each
    forked worker would otherwise import it (and, for ``iosvc://``, gRPC) by itself on its
    way to the first batch. Importing creates no client, so gRPC stays fork-safe."""
    with contextlib.suppress(ImportError, ValueError):  # the workers report it, as before
        fsspec.get_filesystem_class(protocol_of(url))


_RESULT_PIPE_BYTES = 4 << 20  # > one batch of 256 samples of 10 KiB


def widen_result_pipe(iterator: Any, size: int = _RESULT_PIPE_BYTES) -> int:
    """Give the pipe that carries batches from the workers ``size`` bytes (Linux; capped at
    ``/proc/sys/fs/pipe-max-size``); return its size, or 0 if it has none to change.

    Batches that do not travel in shared memory (``bytes`` and ``str`` fields are pickled)
    go through this pipe, 64 KiB by default: a 2.5 MB batch of images then took ~40
    alternations of writer and reader, which on 2 cores cost more than the reading (images:
    4.0 -> 2.2 s per epoch of 200k samples with a 1 MiB pipe).
    """
    queue = getattr(iterator, "_worker_result_queue", None)
    reader = getattr(queue, "_reader", None)
    setter = getattr(fcntl, "F_SETPIPE_SZ", None)
    getter = getattr(fcntl, "F_GETPIPE_SZ", None)
    if reader is None or setter is None or getter is None:
        return 0
    try:
        fd = reader.fileno()
        current = int(fcntl.fcntl(fd, getter))
    except (OSError, ValueError):
        return 0
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = min(size, int(f.read()))
    except (OSError, ValueError):
        size = min(size, 1 << 20)
    if size > current:
        # Fails e.g. when the user's pipe-buffer quota (pipe-user-pages-soft) is used up.
        with contextlib.suppress(OSError):
            current = int(fcntl.fcntl(fd, setter, size))
    return current


def forks_workers(context: Any) -> bool:
    """True if DataLoader workers started with ``context`` are forked from this process."""
    if context is None:
        return multiprocessing.get_start_method() == "fork"
    if isinstance(context, str):
        return context == "fork"
    return bool(context.get_start_method() == "fork")


class DataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` that knows about :class:`StreamingDataset`.

    Takes the same arguments. With a :class:`StreamingDataset` it also:

    - tells the dataset its ``batch_size`` (workers get whole batches round-robin, which the
      order must know for exact resume and shard locality);
    - starts worker processes with ``multiprocessing_context="forkserver"`` when this
      process has already used iosvc's gRPC client (which cannot work in a forked child;
      see :func:`grpc_used_before_fork`), else forks them (faster: no re-import of torch),
      unless you pass a context;
    - keeps forked workers off this process's heap: the objects that exist when workers are
      forked are frozen (``gc.freeze()``) for the fork and unfrozen right after, so a
      worker's garbage collections never walk (and copy-on-write) the parent's objects. A
      worker's first full collection otherwise touched every page of a torch-sized heap:
      0.1-0.2 s and 40 MB per worker before its first batch on this project's 2-core VM;
    - widens the pipe that carries batches from the workers (see :func:`widen_result_pipe`);
    - has workers put batch fields in reusable slots of shared memory (``dataloaders._arena``;
      not with ``pin_memory=True``): numeric fields instead of a fresh segment per batch,
      ``bytes`` fields of raw shards instead of pickling them through the result pipe;
    - has each worker plan its epoch and start loading its first shards as it starts
      (:meth:`StreamingDataset.prepare`, after your ``worker_init_fn`` if you pass one);
    - advances the dataset's epoch after each complete pass (persistent workers too), and
      restarts persistent workers when the epoch or state was changed by hand;
    - offers :meth:`state_dict` / :meth:`load_state_dict` counting the batches you consumed.
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, **kwargs: Any) -> None:
        fast = False
        if isinstance(dataset, StreamingDataset):
            if batch_size is None:
                raise ValueError("dataloaders.DataLoader needs a batch_size (>= 1)")
            if dataset.batch_size is None:
                dataset.batch_size = batch_size
            elif dataset.batch_size != batch_size:
                raise ValueError(
                    f"the dataset's batch_size ({dataset.batch_size}) differs from the "
                    f"DataLoader's ({batch_size})"
                )
            # Fast path: the dataset collates whole batches (same result as default_collate),
            # and the DataLoader moves one object per batch.
            fast = kwargs.get("collate_fn") is None and kwargs.get("batch_sampler") is None
        self._choose_context = kwargs.get("multiprocessing_context") is None
        if isinstance(dataset, StreamingDataset):
            kwargs["worker_init_fn"] = functools.partial(
                _start_worker, kwargs.get("worker_init_fn")
            )
        self._batch = batch_size
        if fast:
            drop_last = bool(kwargs.pop("drop_last", False))
            dataset._collated_batches = batch_size
            dataset._drop_last = drop_last
            # Batch fields travel in the workers' batch arenas (reused memory), unless
            # batches are pinned: the pin thread would see references, not tensors.
            dataset._batch_arenas = arena_supported() and not kwargs.get("pin_memory", False)
            kwargs["collate_fn"] = _identity
            super().__init__(dataset, None, **kwargs)
            # As the user asked, so that len(loader) and loader.batch_size read as usual.
            object.__setattr__(self, "batch_size", batch_size)
            object.__setattr__(self, "drop_last", drop_last)
        else:
            if isinstance(dataset, StreamingDataset):
                dataset._collated_batches = 0
                dataset._batch_arenas = False
            super().__init__(dataset, batch_size, **kwargs)
        self._batches = 0
        self._running_epoch: int | None = None
        self._worker_key: tuple[Any, ...] | None = None

    def _key(self) -> tuple[Any, ...]:
        ds = self.dataset
        assert isinstance(ds, StreamingDataset)
        return (ds.epoch, ds._resume_position, ds.seed, ds.shuffle, ds.num_canonical)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds = self.dataset
        if not isinstance(ds, StreamingDataset):
            yield from super().__iter__()
            return
        if ds.num_canonical is None:
            ds.num_canonical = World.detect().world_size * max(1, self.num_workers)
        if self._choose_context and self.num_workers > 0 and self._iterator is None:
            # Decided when the workers start, not at construction: gRPC may be used between.
            if grpc_used_before_fork(ds.url):
                context = multiprocessing.get_context("forkserver")
                # Workers fork from a server that has imported torch and this package once,
                # instead of each importing them (seconds each on a small machine).
                context.set_forkserver_preload(["dataloaders._preload"])
                self.multiprocessing_context = context
            else:
                self.multiprocessing_context = None
        stale = self._worker_key != self._key()
        if self.persistent_workers and self._iterator is not None and stale:
            # The workers' copies of the dataset are out of date: start new workers.
            self._iterator._shutdown_workers()  # type: ignore[attr-defined]
            self._iterator = None
        self._worker_key = self._key()
        epoch = ds.epoch
        starting = self.num_workers > 0 and not (
            self.persistent_workers and self._iterator is not None
        )
        forking = starting and forks_workers(self.multiprocessing_context)
        if forking and not is_local(ds.url):
            _import_filesystem(ds.url)
        if starting and (is_local(ds.url) or protocol_of(ds.url) != "iosvc"):
            # Read once here and inherited by the workers about to start. Not for iosvc://
            # URLs: reading it here could use gRPC (a cluster file without endpoints) after
            # the fork context was chosen above on the promise that it had not. The epoch
            # order is not computed here: each worker sorts only the shuffle windows of its
            # own streams (StreamingDataset._ids_at), in parallel, instead of this process
            # sorting all of them before the first fork.
            ds.manifest  # noqa: B018
        self._running_epoch = epoch
        self._batches = 0
        # The parent's objects go to the permanent generation while the workers fork, so
        # the workers' collections never walk them (the cost of a full collection is pages
        # copied on write in every worker). Unfrozen at once: the parent's own collections
        # are unchanged. Not if the program froze objects itself (unfreeze would undo that).
        freeze = forking and gc.isenabled() and gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            iterator = super().__iter__()  # forks the workers
        finally:
            if freeze:
                gc.unfreeze()
        if self.num_workers > 0:
            widen_result_pipe(iterator)
        for batch in iterator:
            self._batches += 1
            yield open_batch(batch)
        self._running_epoch = None
        self._batches = 0
        ds._finish_epoch(epoch)
        self._worker_key = self._key()  # what persistent workers moved on to by themselves

    def state_dict(self) -> dict[str, Any]:
        """The dataset's state after the batches consumed so far (see StreamingDataset)."""
        ds = self.dataset
        if not isinstance(ds, StreamingDataset):
            raise TypeError("state_dict needs a StreamingDataset")
        taken = self._batches * (self._batch or 1) if self._running_epoch is not None else 0
        return ds.state_dict(taken=taken)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next iteration."""
        ds = self.dataset
        if not isinstance(ds, StreamingDataset):
            raise TypeError("load_state_dict needs a StreamingDataset")
        ds.load_state_dict(state)
        self._running_epoch = None
        self._batches = 0
