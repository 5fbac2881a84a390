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
        sh("up", "--servers", "2", "--memory", "1GiB")
        try:
            run_steps(work)
        finally:
            console.rule("6. stop the cluster")
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
    sh("ls", "demo")


if __name__ == "__main__":
    main()
