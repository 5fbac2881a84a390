"""Run under ``torchrun --nproc_per_node=2`` by test_ddp.py (gloo on CPU).

``python ddp_worker.py MODE URL OUT`` with MODE:

- ``epochs``: two epochs with 2 DataLoader workers per rank, an all-reduce per batch (uneven
  batch counts would deadlock it), then epoch 0 again from a fresh dataset; writes each
  rank's ids per epoch to ``OUT/rank{r}.json``.
- ``kill``: takes 3 batches, writes their ids and the loader state, then SIGKILLs itself.
- ``resume``: loads ``OUT/state.json`` and reads the rest of the epoch (any world size).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dataloaders

BATCH = 8


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(i) for i in batch["id"].tolist()]


def main() -> None:
    mode, url, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    result: dict[str, object] = {"rank": rank}
    ds = dataloaders.StreamingDataset(url, seed=11)
    loader = dataloaders.DataLoader(ds, batch_size=BATCH, num_workers=2)
    if mode == "epochs":
        epochs = []
        for _ in range(2):
            seen: list[int] = []
            for batch in loader:
                seen += ids(batch)
                if distributed:
                    step = torch.ones(1)
                    dist.all_reduce(step)  # deadlocks if one rank has fewer batches
            epochs.append(seen)
        again = dataloaders.DataLoader(
            dataloaders.StreamingDataset(url, seed=11), batch_size=BATCH, num_workers=2
        )
        epochs.append([i for batch in again for i in ids(batch)])
        result["epochs"] = epochs
        result["len"] = len(ds)
    elif mode == "kill":
        it = iter(loader)
        taken = [i for _ in range(3) for i in ids(next(it))]
        state = loader.state_dict()
        (out / f"kill{rank}.json").write_text(json.dumps({"taken": taken, "state": state}))
        if distributed:
            dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "resume":
        loader.load_state_dict(json.loads((out / "state.json").read_text()))
        result["rest"] = [i for batch in loader for i in ids(batch)]
    (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
