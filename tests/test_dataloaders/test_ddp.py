"""torchrun + DDP (gloo, 2 ranks) over a real iosvc cluster: coverage, order, kill and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import dataloaders

from .helpers import make_samples

N = 203  # odd: padding must make the two ranks equal
WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def _torchrun(mode: str, url: str, out: Path, cluster: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IOSVC_CLUSTER": cluster, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            WORKER,
            mode,
            url,
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _read(out: Path, name: str) -> Any:
    return json.loads((out / name).read_text())


@pytest.fixture
def dataset(iosvc_url: str) -> str:
    dataloaders.write_shards(make_samples(N), iosvc_url, shard_bytes=24 << 10)
    return iosvc_url


def test_ddp_two_ranks_epochs(dataset: str, tmp_path: Path, use_cluster: str) -> None:
    proc = _torchrun("epochs", dataset, tmp_path, use_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_read(tmp_path, f"epochs{r}.json") for r in range(2)]
    for epoch in range(2):
        a, b = (ranks[r]["epochs"][epoch] for r in range(2))
        assert len(a) == len(b) == ranks[0]["len"] == 102  # equal: ceil(203 / 2)
        assert not set(a) & set(b) or len(set(a) | set(b)) == N  # disjoint but one pad
        assert sorted(set(a) | set(b)) == list(range(N))  # complete
        assert len(a) + len(b) - len(set(a) | set(b)) == 1  # exactly one repeat (padding)
    for r in range(2):
        epochs = ranks[r]["epochs"]
        assert epochs[2] == epochs[0]  # same seed, same order
        assert epochs[1] != epochs[0]  # another epoch, another order


def test_ddp_kill_then_resume_on_one_rank(dataset: str, tmp_path: Path, use_cluster: str) -> None:
    proc = _torchrun("kill", dataset, tmp_path, use_cluster)
    assert proc.returncode != 0  # the ranks were killed mid-epoch
    killed = [_read(tmp_path, f"kill{r}.json") for r in range(2)]
    assert killed[0]["state"] == killed[1]["state"]  # one state for the whole job
    (tmp_path / "state.json").write_text(json.dumps(killed[0]["state"]))
    taken = killed[0]["taken"] + killed[1]["taken"]
    assert len(taken) == 2 * 3 * 8
    # Resume the 2-rank job (2 workers per rank) here: 1 rank, no worker processes.
    loader = dataloaders.DataLoader(dataloaders.StreamingDataset(dataset), batch_size=8)
    loader.load_state_dict(killed[0]["state"])
    rest = [int(i) for batch in loader for i in batch["id"].tolist()]
    assert sorted(taken + rest) == list(range(N))  # nothing seen twice, nothing skipped
