"""Who this process is: rank and world size (DDP) and DataLoader worker id and count."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["World"]


@dataclass(frozen=True, slots=True)
class World:
    """A (rank, worker) position among ``world_size`` ranks of ``num_workers`` workers each.

    Read from ``torch.distributed`` when it is initialised, else from the ``RANK`` and
    ``WORLD_SIZE`` environment variables (``torchrun`` sets them), else a single process;
    the worker from ``torch.utils.data.get_worker_info()``.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.worker < self.num_workers):
            raise ValueError(f"invalid world {self}")

    @property
    def partitions(self) -> int:
        """(rank, worker) pairs: the readers that share an epoch."""
        return self.world_size * self.num_workers

    @classmethod
    def detect(cls) -> World:
        rank, world_size = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                raise LookupError
        except (ImportError, LookupError):
            rank = int(os.environ.get("RANK", "0"))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        worker, num_workers = 0, 1
        try:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            if info is not None:
                worker, num_workers = info.id, info.num_workers
        except ImportError:
            pass
        return cls(rank, world_size, worker, num_workers)
