"""End-to-end demo on the embedded local cluster (``make demo`` / ``python -m iosvc.demo``).

Starts a 2-server cluster, moves real data through the CLI, the Python client, zarr and pandas,
prints what it did, and stops the cluster. Uses its own cluster file, so it never touches a
cluster you already run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

console = Console()


def sh(*args: str) -> str:
    """Run an ``iosvc`` command as a user would, echo it and its output."""
    console.print(f"[bold cyan]$ iosvc {' '.join(args)}[/bold cyan]")
    proc = subprocess.run(
        [sys.executable, "-m", "iosvc.cli", *args], capture_output=True, text=True, check=False
    )
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        console.print(out, highlight=False, markup=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed: iosvc {' '.join(args)}")
    return proc.stdout


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="iosvc-demo-") as tmp:
        work = Path(tmp)
        os.environ["IOSVC_CLUSTER"] = str(work / "cluster.json")
        console.rule("1. start a local cluster: 2 servers, 1 GiB of DRAM each")
        # --pull-root: the servers may read the demo's "parallel file systems" themselves,
        # so step 7's stage-in goes from the file system straight into the buffer.
        (work / "sites").mkdir()
        sh("up", "--servers", "2", "--memory", "1GiB", "--pull-root", str(work / "sites"))
        try:
            run_steps(work)
        finally:
            console.rule("8. stop the cluster")
            sh("down")


def run_steps(work: Path) -> None:
    import numpy as np

    console.rule("2. the CLI: put, ls, cat, get, du, status")
    big = work / "climate.f32"
    field = np.random.default_rng(0).normal(280, 10, size=16 * 1024 * 1024).astype("float32")
    field.tofile(big)
    notes = work / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"day{i}.txt").write_text(f"observation log, day {i}\n")
    sh("put", str(big), "demo/climate.f32")
    sh("put", "-r", str(notes), "demo/")
    sh("ls", "-l", "demo")
    sh("cat", "demo/notes/day1.txt")
    sh("get", "demo/climate.f32", str(work / "back.f32"))
    same = (work / "back.f32").read_bytes() == big.read_bytes()
    console.print(
        f"round trip of {big.stat().st_size >> 20} MiB through 2 servers: identical={same}"
    )
    if not same:
        raise SystemExit("demo: data changed in flight")
    sh("du", "demo")
    sh("status")

    console.rule("3. the Python client: 2,000 small files in batches")
    from iosvc.client import Client

    client = Client()
    files = {f"demo/samples/{i:05d}.bin": os.urandom(4096) for i in range(2000)}
    t0 = time.perf_counter()
    client.write_many(files)
    t1 = time.perf_counter()
    back = client.read_many(list(files))
    t2 = time.perf_counter()
    assert back == list(files.values())
    console.print(
        f"wrote {len(files)} x 4 KiB in {t1 - t0:.2f} s ({len(files) / (t1 - t0):,.0f} files/s), "
        f"read them back in {t2 - t1:.2f} s ({len(files) / (t2 - t1):,.0f} files/s), all verified"
    )

    console.rule("4. zarr v3 on iosvc:// (Blosc lz4 + shuffle)")
    import zarr
    from zarr.codecs import BloscCodec

    arr = zarr.create_array(
        "iosvc://demo/field.zarr",
        shape=(1024, 1024),
        chunks=(256, 256),
        dtype="float32",
        compressors=BloscCodec(cname="lz4", shuffle="shuffle"),
        overwrite=True,
    )
    arr[:] = field[: 1024 * 1024].reshape(1024, 1024)
    again = zarr.open_array("iosvc://demo/field.zarr", mode="r")
    ok = bool(np.array_equal(again[:], arr[:]))
    stored = sum(e["size"] for e in client.ls("demo/field.zarr", recursive=True))
    console.print(
        f"zarr array {again.shape} {again.dtype}: read back equal={ok}; "
        f"{arr.nbytes >> 20} MiB stored as {stored / 2**20:.1f} MiB "
        f"(ratio {arr.nbytes / stored:.2f})"
    )

    console.rule("5. pandas / pyarrow Parquet on iosvc://")
    import pandas as pd

    df = pd.DataFrame({"station": np.arange(1000) % 17, "temp": field[:1000]})
    df.to_parquet("iosvc://demo/obs.parquet")
    back_df = pd.read_parquet("iosvc://demo/obs.parquet")
    console.print(f"parquet round trip: {len(back_df)} rows, equal={back_df.equals(df)}")
    console.print(back_df.groupby("station")["temp"].mean().head(3).to_string())

    console.rule("6. dataloaders: shards on iosvc -> 2-rank DDP training")
    demo_dataloaders()
    sh("ls", "demo")

    console.rule("7. staging: register at one site, replicate to another, stage into the buffer")
    demo_staging(work, field)


def demo_staging(work: Path, field: object) -> None:
    """Two directories stand in for two clusters' parallel file systems."""
    import numpy as np

    for site in ("hpc-a", "hpc-b"):
        (work / "sites" / site).mkdir(parents=True, exist_ok=True)
    dataset = work / "sites/hpc-a/era5-demo"
    dataset.mkdir()
    values = np.asarray(field)
    for month in range(12):
        part = values[month * 65536 : (month + 1) * 65536]
        (dataset / f"t2m-{month + 1:02d}.f32").write_bytes(part.tobytes())
    (dataset / "README").write_text("12 monthly 2 m temperature slices (demo)\n")
    sites = work / "sites.toml"
    sites.write_text(
        f'[sites.hpc-a]\nurl = "{work}/sites/hpc-a"\n\n'
        f'[sites.hpc-b]\nurl = "{work}/sites/hpc-b"\nbuffer = "iosvc:///datasets"\n'
    )
    os.environ["IOSVC_SITES"] = str(sites)
    os.environ["IOSVC_CATALOG"] = str(work / "catalog.db")
    sh("datasets", "register", "era5-demo", "--name", "era5", "--site", "hpc-a")
    sh("stage", "era5", "--to", "hpc-b", "--into-buffer")
    sh("datasets", "show", "era5")
    sh("ls", "datasets/era5")


def _digits() -> tuple[object, object, str]:
    """scikit-learn's bundled digits (8x8 images, 10 classes), or a synthetic stand-in."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        # Same shape and size as the digits set: 10 class prototypes plus noise, fixed seed.
        rng = np.random.default_rng(0)
        prototypes = rng.uniform(0, 16, size=(10, 8, 8))
        labels = np.arange(1797) % 10
        images = prototypes[labels] + rng.normal(0, 4, size=(1797, 8, 8))
        return images.clip(0, 16).astype("float32"), labels, "synthetic digits (no sklearn)"
    digits = load_digits()
    return digits.images.astype("float32"), digits.target, "scikit-learn digits"


def _ddp_train(rank: int, url: str, port: int, epochs: int) -> None:
    """One rank of the demo's DDP job (gloo on CPU), started by ``mp.spawn``."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import dataloaders

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = dataloaders.DataLoader(dataloaders.StreamingDataset(url, seed=0), batch_size=32)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total = torch.zeros(3)  # loss sum, correct, samples
        for batch in loader:
            x, y = batch["image"] / 16.0, batch["label"]
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += torch.tensor([loss.item() * len(y), (out.argmax(1) == y).sum().item(), len(y)])
        seconds = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(total)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if rank == 0:
            loss_avg, acc, n = total[0] / total[2], total[1] / total[2], int(total[2])
            print(
                f"epoch {epoch}: 2 ranks, {n} samples, loss {loss_avg:.3f}, "
                f"accuracy {acc:.1%}, {n / seconds.item():,.0f} samples/s",
                flush=True,
            )
    if rank == 0:
        state = loader.state_dict()
        print(f"loader state for exact resume: {state['epoch']=}, {state['position']=}", flush=True)
    dist.destroy_process_group()


def demo_dataloaders() -> None:
    """Pack a dataset into compressed shards on iosvc and train on it with 2 DDP ranks."""
    import socket

    import torch.multiprocessing as mp

    import dataloaders

    images, labels, name = _digits()
    url = "iosvc://demo/digits"
    summary = dataloaders.write_shards(
        {"image": images, "label": labels}, url, shard_bytes=32 << 10, overwrite=True
    )
    console.print(f"{name}: {summary}", highlight=False)
    sh("shards", "info", url)
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: this process has used iosvc's gRPC client, which cannot be forked.
    mp.spawn(_ddp_train, args=(url, port, 2), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    # The shards read were kept in the node cache (tmpfs) for the next readers on this
    # node; what a Slurm epilog would do once the job is over:
    sh("shards", "buffers", "--clear")


if __name__ == "__main__":
    main()
