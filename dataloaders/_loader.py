"""``dataloaders.DataLoader``: ``torch.utils.data.DataLoader`` with the right defaults for
:class:`StreamingDataset`, epoch tracking and a ``state_dict`` counted in batches."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from typing import Any

import torch.utils.data

from dataloaders._dataset import StreamingDataset
from dataloaders._fs import is_local, protocol_of
from dataloaders._world import World

__all__ = ["DataLoader", "grpc_used_before_fork"]


def _identity(batch: Any) -> Any:
    return batch


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


class DataLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` that knows about :class:`StreamingDataset`.

    Takes the same arguments. With a :class:`StreamingDataset` it also:

    - tells the dataset its ``batch_size`` (workers get whole batches round-robin, which the
      order must know for exact resume and shard locality);
    - starts worker processes with ``multiprocessing_context="forkserver"`` when this
      process has already used iosvc's gRPC client (which cannot work in a forked child;
      see :func:`grpc_used_before_fork`), else forks them (faster: no re-import of torch),
      unless you pass a context;
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
        self._batch = batch_size
        if fast:
            drop_last = bool(kwargs.pop("drop_last", False))
            dataset._collated_batches = batch_size
            dataset._drop_last = drop_last
            kwargs["collate_fn"] = _identity
            super().__init__(dataset, None, **kwargs)
            # As the user asked, so that len(loader) and loader.batch_size read as usual.
            object.__setattr__(self, "batch_size", batch_size)
            object.__setattr__(self, "drop_last", drop_last)
        else:
            if isinstance(dataset, StreamingDataset):
                dataset._collated_batches = 0
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
                context.set_forkserver_preload(["dataloaders"])
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
        if starting and (is_local(ds.url) or protocol_of(ds.url) != "iosvc"):
            # Computed once here and inherited by the workers about to start. Not for
            # iosvc:// URLs: reading the manifest here would use gRPC before the workers
            # fork (the fork context was chosen above on the promise that it had not).
            ds.order(epoch)
        self._running_epoch = epoch
        self._batches = 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch
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
