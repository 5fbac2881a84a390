"""Streaming data loaders side by side: this project vs MosaicML streaming, LitData, WebDataset
and plain files, on the same data, read with the same DataLoader settings.

    python bench/dataloader.py [--quick] --json bench/results/dataloader.json
    python bench/dataloader.py --make-peer-venv        # builds the peers' venv (once, ~6 GB)

Datasets (made here, deterministic; nothing downloaded):

- ``images``: small samples of 4-16 KiB incompressible bytes (what JPEG bytes are to a codec:
  no loader decodes them here) plus an int label; 200k samples (20k with ``--quick``).
- ``arrays``: 64x64 float32 fields, smooth climate-like (``machine_limits.md`` section 3
  formula: sines plus N(0, 0.05) noise) plus an int label; 1 GiB (128 MiB with ``--quick``).

Systems: ``iosvc-local`` (dataloaders.StreamingDataset on local disk), ``iosvc-remote`` (the
same shards on a 2-server iosvc cluster started here, DRAM store, ``node_cache=False``: every
byte of every epoch over the servers' data ports, see ``iosvc/dataplane.py``),
``iosvc-remote-cached`` (the same with the node cache on, the default: one epoch fills it,
reported as ``fill_*``, then the measured epochs read it; ``dataloaders/_slots.py``),
``iosvc-remote-grpc`` (the same servers with
``IOSVC_DATA_PLANE=0``: every byte through gRPC, as before the data plane),
``iosvc-local-private`` and ``iosvc-remote-private`` (the same with ``buffer_dir=None``:
shards received into private memory and batches in PyTorch's fresh shared memory, as
before the slot files and batch arenas of ``dataloaders/_slots.py`` and ``_arena.py``),
``iosvc-remote-dir`` (the same on 2 servers with a ``--dir`` store on tmpfs, DRAM: the
client reads the chunk files in place, as it does from any server on its own host),
``tcp-ceiling`` and ``fill-ceiling`` (not loaders: the ``iosvc-local`` epoch while two
plain processes move the dataset's bytes through loopback TCP beside it, from memory out of
cache into a reused 64 MiB buffer, or, for ``fill-ceiling``, into fresh tmpfs files as a
node cache's filling epoch must; the epoch ends when both have: ``_Wire``. On these 2
cores, where the servers share the reader's cores, no transport over TCP can do that work
for free, so these bound what ``iosvc-remote`` and the filling epoch can reach here),
``files`` (one file per sample, map-style Dataset), ``webdataset`` (tar shards),
``mosaicml-streaming`` (MDS) and ``litdata``. Each system writes the data its own way, then
is read for one shuffled epoch in a fresh process by ``DataLoader(batch_size=256,
num_workers=2)`` (each system's own loader class where it has one). MosaicML streaming and
LitData import torchvision, which does not load beside this project's torch 2.13.0 CPU wheel,
so they run in a separate venv (torch 2.14.1 + torchvision 0.29.1 from this machine's wheels):
``--make-peer-venv`` builds it and ``--peer-python`` points at it (default:
``~/.cache/iosvc/bench-dataloader-venv``).

Each cell: samples/s and MB/s (payload bytes delivered per second) over the whole epoch
including start-up (the median of ``REPEATS`` epochs, each in a fresh process; all are kept
in ``samples_per_s_runs``), time to first batch (the median of those epochs' and of
``PROBES`` more fresh processes that stop at their first batch: ``first_batch_probes_s``), peak
RSS of the reader and its workers (sum, sampled every 20 ms), bytes on disk (or on the iosvc
servers), or ``error``. The machine has 2 cores;
the iosvc servers share them with the reader. Every clock starts after the system's imports
and a ``gc.collect()``, so no system's start-up pays for a collection its imports left due.
Each ``iosvc://`` epoch is run right after an ``iosvc-local`` one: ``paired_ratio_to_local``
is the median of those pairs' ratios, robust to the machine's drift between cells (the
ratio of two cells' medians is not). ``paired_after_first_ratio_to_local`` is the same
from each epoch's samples after its first batch (``after_first_samples_per_s``): the
streaming rate without the start-up, which weighs more in these short epochs (~0.5 s)
than in a training run's.

``--buffers huge`` mounts a tmpfs with ``huge=within_size`` (2 MiB pages; root) for the
readers' buffer directory and the in-place servers' store, as README advises administrators;
the default keeps both on ``/dev/shm`` (4 KiB pages).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import json
import mmap
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SYSTEMS = [
    "iosvc-local",
    "iosvc-local-private",
    "iosvc-remote",
    "iosvc-remote-cached",
    "iosvc-remote-grpc",
    "iosvc-remote-private",
    "iosvc-remote-dir",
    "tcp-ceiling",
    "fill-ceiling",
    "files",
    "webdataset",
    "mosaicml-streaming",
    "litdata",
]
REMOTE = {
    "iosvc-remote",
    "iosvc-remote-cached",
    "iosvc-remote-grpc",
    "iosvc-remote-private",
    "iosvc-remote-dir",
}
#: CPUs a reader process runs on with --pin (inherited by its workers).
PIN_ENV = "BENCH_READER_CPUS"
#: Not loaders: the local epoch with a remote read's unavoidable work beside it (_Wire).
CEILINGS = {"tcp-ceiling", "fill-ceiling"}
PEERS = {"mosaicml-streaming", "litdata"}  # run in the peer venv
OTHER_PEERS = {"webdataset", "files"}  # run in this venv
DATASETS = ["images", "arrays"]
BATCH = 256
WORKERS = 2
REPEATS = 3  # epochs per cell, each in a fresh process
PROBES = 4  # more fresh processes timing the first batch only
DEFAULT_PEER_VENV = Path.home() / ".cache" / "iosvc" / "bench-dataloader-venv"
PEER_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "mosaicml-streaming==0.13.0",
    "litdata==0.2.76",
    "webdataset",
]


# ------------------------------------------------------------------------------ the data
def sizes(quick: bool) -> dict[str, int]:
    return {"images": 20_000 if quick else 200_000, "arrays": 8192 if quick else 65_536}


def _image_block(start: int, count: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([1, start])
    lengths = rng.integers(4096, 16385, size=count)
    blob = rng.integers(0, 256, size=int(lengths.sum()), dtype=np.uint8).tobytes()
    labels = rng.integers(0, 1000, size=count)
    ends = np.cumsum(lengths)
    return [
        {"image": blob[int(e - n) : int(e)], "label": int(lab)}
        for e, n, lab in zip(ends, lengths, labels, strict=True)
    ]


def _array_block(start: int, count: int) -> list[dict[str, Any]]:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    rng = np.random.default_rng([2, start])
    shift = rng.uniform(0, 1000, size=(count, 1, 1)).astype(np.float32)
    fields = 280 + 10 * (
        np.sin((x + shift) / 150) + 0.7 * np.cos((y + shift) / 97) + 0.3 * np.sin((x + y) / 41)
    )
    fields = (fields + rng.normal(0, 0.05, size=fields.shape)).astype(np.float32)
    labels = rng.integers(0, 10, size=count)
    return [{"x": fields[k], "label": int(labels[k])} for k in range(count)]


BLOCK = 4096  # samples are made in blocks of this many (any process can make any block)


def generate(dataset: str, n: int, start: int = 0, stop: int | None = None) -> Iterator[Any]:
    """Samples ``[start, stop)`` of the ``dataset`` of ``n`` samples, always the same."""
    stop = n if stop is None else min(stop, n)
    make = _image_block if dataset == "images" else _array_block
    for block in range(start - start % BLOCK, stop, BLOCK):
        samples = make(block, min(BLOCK, n - block))
        for k, sample in enumerate(samples):
            if start <= block + k < stop:
                yield sample


def payload(sample: dict[str, Any]) -> int:
    value = sample["image"] if "image" in sample else sample["x"]
    return len(value) if isinstance(value, bytes) else int(np.asarray(value).nbytes)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- writers
def write_ours(dataset: str, n: int, out: str) -> int:
    import dataloaders

    summary = dataloaders.write_shards(generate(dataset, n), out, overwrite=True)
    return summary.bytes


def write_files(dataset: str, n: int, out: str) -> int:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    labels = []
    for i, sample in enumerate(generate(dataset, n)):
        sub = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(exist_ok=True)
        if dataset == "images":
            (sub / f"{i:07d}.jpg").write_bytes(sample["image"])
        else:
            np.save(sub / f"{i:07d}.npy", sample["x"])
        labels.append(sample["label"])
    np.save(root / "labels.npy", np.array(labels))
    return du(root)


def write_webdataset(dataset: str, n: int, out: str) -> int:
    import webdataset as wds

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "shard-%06d.tar"), maxsize=64 << 20, verbose=0) as sink:
        for i, sample in enumerate(generate(dataset, n)):
            record: dict[str, Any] = {"__key__": f"{i:08d}", "cls": sample["label"]}
            if dataset == "images":
                record["jpg"] = sample["image"]
            else:
                record["npy"] = sample["x"]
            sink.write(record)
    return du(root)


def write_mds(dataset: str, n: int, out: str) -> int:
    from streaming import MDSWriter

    columns = (
        {"image": "bytes", "label": "int"}
        if dataset == "images"
        else {"x": "ndarray:float32:64,64", "label": "int"}
    )
    with MDSWriter(out=out, columns=columns, size_limit=64 << 20) as writer:
        for sample in generate(dataset, n):
            writer.write(sample)
    return du(Path(out))


def _litdata_block(dataset: str, n: int, start: int) -> Iterator[dict[str, Any]]:
    yield from generate(dataset, n, start, start + BLOCK)


def write_litdata(dataset: str, n: int, out: str) -> int:
    import litdata

    litdata.optimize(
        fn=functools.partial(_litdata_block, dataset, n),
        inputs=list(range(0, n, BLOCK)),
        output_dir=out,
        chunk_bytes="64MB",
        num_workers=1,
        mode="overwrite",
    )
    return du(Path(out))


WRITERS: dict[str, Callable[[str, int, str], int]] = {
    "iosvc-local": write_ours,
    "iosvc-local-private": write_ours,
    "iosvc-remote": write_ours,
    "iosvc-remote-grpc": write_ours,
    "iosvc-remote-private": write_ours,
    "iosvc-remote-dir": write_ours,
    "iosvc-remote-cached": write_ours,
    "files": write_files,
    "webdataset": write_webdataset,
    "mosaicml-streaming": write_mds,
    "litdata": write_litdata,
}


# ----------------------------------------------------------------------------- readers
class FilesDataset:
    """Map-style: one file per sample (what an ImageFolder reader does, minus decoding)."""

    def __init__(self, root: str, dataset: str) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.labels = np.load(self.root / "labels.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sub = self.root / f"{i // 1000:04d}"
        if self.dataset == "images":
            return {"image": (sub / f"{i:07d}.jpg").read_bytes(), "label": int(self.labels[i])}
        return {"x": np.load(sub / f"{i:07d}.npy"), "label": int(self.labels[i])}


def _wds_map(dataset: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def convert(sample: dict[str, Any]) -> dict[str, Any]:
        label = int(sample["cls"])
        if dataset == "images":
            return {"image": sample["jpg"], "label": label}
        return {"x": sample["npy"], "label": label}

    return convert


def _litdata_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """LitData 0.2.76 maps local chunks and hands ``bytes`` fields out as memoryviews of the
    map, which its default collate cannot batch (unequal lengths) nor a worker pickle: made
    ``bytes`` here, as every other system delivers them; other fields as ``default_collate``."""
    from torch.utils.data import default_collate

    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], (bytes, memoryview)):
            out[key] = [bytes(v) for v in values]
        else:
            out[key] = default_collate(values)
    return out


def make_loader(system: str, dataset: str, location: str) -> Any:
    import torch.utils.data

    if system.startswith("iosvc-") or system in CEILINGS:
        import dataloaders

        # The node cache only where measured: elsewhere each epoch reads its source afresh.
        cache = system == "iosvc-remote-cached"
        ds = dataloaders.StreamingDataset(location, seed=0, node_cache=cache)
        return dataloaders.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS)
    if system == "files":
        return torch.utils.data.DataLoader(
            FilesDataset(location, dataset),  # type: ignore[arg-type]
            batch_size=BATCH,
            shuffle=True,
            num_workers=WORKERS,
        )
    if system == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in Path(location).glob("*.tar"))
        pipeline = (
            wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node)
            .shuffle(1000)
            .decode()
            .map(_wds_map(dataset))
        )
        return torch.utils.data.DataLoader(pipeline, batch_size=BATCH, num_workers=WORKERS)
    if system == "mosaicml-streaming":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = StreamingDataset(local=location, shuffle=True, batch_size=BATCH)
        return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS)
    if system == "litdata":
        import litdata

        ds = litdata.StreamingDataset(input_dir=location, shuffle=True)
        return litdata.StreamingDataLoader(
            ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=_litdata_collate
        )
    raise ValueError(system)


def _rss_tree(pid: int) -> int:
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def read_epoch(
    system: str, dataset: str, location: str, first_only: bool = False
) -> dict[str, Any]:
    """One shuffled epoch in this (fresh) process: the measurement (with ``first_only``,
    up to the first batch: a probe of the time to first batch)."""
    peak = [0]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_tree(os.getpid()))
            stop.wait(0.02)

    # Imports are not the loader's start-up: done before the clock starts, for every system.
    import importlib

    import torch.utils.data  # noqa: F401

    modules = {
        "iosvc-local": "dataloaders",
        "iosvc-local-private": "dataloaders",
        "iosvc-remote": "dataloaders",
        "iosvc-remote-grpc": "dataloaders",
        "iosvc-remote-private": "dataloaders",
        "iosvc-remote-dir": "dataloaders",
        "iosvc-remote-cached": "dataloaders",
        "webdataset": "webdataset",
        "mosaicml-streaming": "streaming",
        "litdata": "litdata",
    }
    if system in modules:
        module = importlib.import_module(modules[system])
        if module.__name__ == "dataloaders":  # its names are imported on first use
            for name in ("StreamingDataset", "DataLoader"):
                getattr(module, name)
    if system in REMOTE:  # the iosvc client and gRPC: imports too, as for every other system
        importlib.import_module("iosvc.client")
    # The same garbage-collector state at the start of every clock: the imports above leave
    # a system-dependent debt of objects a full collection has yet to walk (0.1-0.2 s with
    # torch loaded), which otherwise lands inside one system's timed start-up and not
    # another's, depending only on how much its own import allocated.
    wire = _Wire(du(Path(location)), fill=system == "fill-ceiling") if system in CEILINGS else None
    gc.collect()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if wire is not None:
        wire.go()
    loader = make_loader(system, dataset, location)
    first = None
    samples = 0
    first_samples = 0
    nbytes = 0
    for batch in loader:
        labels = batch["label"]
        if first is None:
            first = time.perf_counter() - t0
            first_samples = len(labels)
            if first_only:
                stop.set()
                if wire is not None:
                    wire.stop()  # not left running (and holding tmpfs) into the next probe
                return {"first_batch_s": first}
        samples += len(labels)
        if dataset == "images":
            nbytes += sum(len(b) for b in batch["image"])
        else:
            nbytes += int(batch["x"].numel()) * 4
    seconds = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    if wire is not None:  # a remote epoch has not ended before its bytes have arrived
        extra["wire_s"] = wire.wait()
        extra["epoch_alone_s"] = seconds
        seconds = max(seconds, extra["wire_s"])
    stop.set()
    sampler.join()
    # CPU time of the reader and its (joined) workers: robust when other jobs share the cores.
    del loader
    gc.collect()
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    return {
        "cpu_s": cpu,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "mb_per_s": nbytes / seconds / 1e6,
        "first_batch_s": first,
        # The epoch without its start-up: samples after the first batch, per second since.
        "after_first_samples_per_s": (samples - first_samples) / (seconds - (first or 0.0)),
        "peak_rss_bytes": peak[0],
        **extra,
    }


class _Wire:
    """What a remote epoch must do beside the local one, and nothing else: ``nbytes`` sent by
    one process and received by another over loopback TCP (plain blocking sockets, 1 MiB
    sends from 256 MiB of memory out of cache, 4 MiB socket buffers as
    ``iosvc.dataplane.tune_socket`` sets), received into a reused 64 MiB buffer or, with
    ``fill``, into fresh 64 MiB tmpfs files as a node cache's filling epoch must.

    Both processes are ready (memory touched, connected) when the constructor returns, and
    start at :meth:`go`.
    """

    def __init__(self, nbytes: int, *, fill: bool) -> None:
        self.nbytes = nbytes
        self._start = 0.0
        into = tempfile.mkdtemp(prefix="bench-wire-", dir="/dev/shm") if fill else None
        self._into = into
        listener = socket.create_server(("127.0.0.1", 0))
        go_r, self._go = os.pipe()
        self._done, done_w = os.pipe()
        self._pids = [self._fork(self._send, listener.getsockname(), go_r)]
        conn, _ = listener.accept()
        listener.close()
        self._pids.append(self._fork(self._receive, conn, done_w))
        conn.close()
        os.close(go_r)
        os.close(done_w)

    @staticmethod
    def _fork(target: Callable[..., None], *args: Any) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                target(*args)
            finally:
                os._exit(0)
        return pid

    def _send(self, address: tuple[str, int], go: int) -> None:
        if os.environ.get(PIN_ENV):  # (--pin) the sender stands for the servers
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - {0} or {0})
        source = memoryview(os.urandom(1 << 20) * 256)
        sock = socket.create_connection(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        os.read(go, 1)
        sent = 0
        while sent < self.nbytes:
            at = sent % len(source)
            part = source[at : at + min(1 << 20, self.nbytes - sent)]
            sock.sendall(part)
            sent += len(part)
        sock.close()

    def _receive(self, sock: socket.socket, done: int) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reused = memoryview(bytearray(64 << 20))
        reused[::4096] = b"x" * len(reused[::4096])  # touched: not fresh memory
        got = 0
        while got < self.nbytes:
            size = min(64 << 20, self.nbytes - got)
            if self._into is None:
                target = reused[:size]
            else:  # a fresh file of the size the node cache would hold
                with open(os.path.join(self._into, str(got)), "w+b") as f:
                    f.truncate(size)
                    target = memoryview(mmap.mmap(f.fileno(), size))
            view = target
            while view:
                n = sock.recv_into(view)
                if n == 0:
                    raise ConnectionError("sender closed early")
                view = view[n:]
            got += size
        os.write(done, struct.pack("<d", time.clock_gettime(time.CLOCK_MONOTONIC)))

    def go(self) -> None:
        self._start = time.clock_gettime(time.CLOCK_MONOTONIC)
        os.write(self._go, b"x")

    def wait(self) -> float:
        """Seconds from :meth:`go` until the receiver had every byte; cleans up."""
        (end,) = struct.unpack("<d", os.read(self._done, 8))
        self._clean_up()
        return float(end - self._start)

    def stop(self) -> None:
        """End both processes now and clean up (a probe that stops at its first batch)."""
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._clean_up()

    def _clean_up(self) -> None:
        for pid in self._pids:
            os.waitpid(pid, 0)
        os.close(self._go)
        os.close(self._done)
        if self._into is not None:
            shutil.rmtree(self._into, ignore_errors=True)


# ------------------------------------------------------------------------- orchestration
def _child(args: argparse.Namespace) -> None:
    """``--child write|read|first SYSTEM DATASET N LOCATION``: one step in a fresh process."""
    action, system, dataset, n, location = args.child
    if os.environ.get(PIN_ENV):  # (--pin) this process and the workers it forks
        os.sched_setaffinity(0, {int(c) for c in os.environ[PIN_ENV].split(",")})
    if action == "write":
        out = {"bytes_on_disk": WRITERS[system](dataset, int(n), location)}
    else:
        out = read_epoch(system, dataset, location, first_only=action == "first")
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(python: str, argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [python, __file__, "--child", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)[-500:]}")


def make_peer_venv(path: Path) -> None:
    """Build the venv of the peers (torch 2.14.1 + torchvision 0.29.1, MDS, LitData)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_REQUIREMENTS], check=True)
    print(f"peer venv ready: {path}/bin/python")


def _peer_python(path: Path) -> tuple[str | None, str]:
    python = path / "bin" / "python"
    if not python.exists():
        return (
            None,
            f"not run: no peer venv at {path} (python bench/dataloader.py --make-peer-venv)",
        )
    probe = subprocess.run(
        [str(python), "-c", "import streaming, litdata"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode:
        return None, "not run: the peer venv cannot import streaming/litdata: " + probe.stderr[
            -300:
        ]
    return str(python), ""


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _mount_huge_tmpfs(path: Path) -> Path:
    """A tmpfs mounted at ``path`` with 2 MiB pages (``huge=within_size``), as README advises
    administrators to give readers' buffers and in-place servers; exits if it cannot be."""
    path.mkdir(parents=True, exist_ok=True)
    # As large as /dev/shm: the readers' default budget (1/8 of it) is then the same.
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    size = shm.f_frsize * shm.f_blocks if shm else 16 << 30
    options = f"huge=within_size,size={size},mode=1777"
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    except subprocess.CalledProcessError:
        raise SystemExit("--buffers huge: cannot mount a tmpfs (root needed)") from None
    # Unmounted at exit, however the run ends (the clusters may fail to start).
    atexit.register(subprocess.run, ["umount", "--lazy", str(path)], check=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller datasets (a few minutes)")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_VENV)
    parser.add_argument("--workdir", type=Path, help="where datasets are written (temp dir)")
    parser.add_argument(
        "--buffers",
        choices=["shm", "huge", "disk"],
        default="shm",
        help="where the readers' buffer directory and the in-place servers' store live: "
        "/dev/shm (4 KiB pages), a tmpfs this run mounts with huge=within_size (2 MiB "
        "pages, as README advises administrators; needs root), or the work directory's disk",
    )
    parser.add_argument(
        "--repeats",
        type=_at_least_one,
        default=REPEATS,
        help="epochs per cell (each a fresh process)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="readers (and their workers) on CPU 0, the iosvc servers (and the ceilings' "
        "senders) on the other CPUs: as on a cluster, where servers do not share a reader's "
        "cores",
    )
    parser.add_argument("--make-peer-venv", action="store_true", help="build the peer venv")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.make_peer_venv:
        make_peer_venv(args.peer_python)
        return
    from dataloaders._slots import SlotDirectory
    from iosvc.client import Client
    from iosvc.server import LocalCluster

    load_start = os.getloadavg()  # other jobs on the 2 cores skew wall-clock rates
    peer_python, peer_error = _peer_python(args.peer_python)
    n_by_dataset = sizes(args.quick)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dataloader-"))
    work.mkdir(parents=True, exist_ok=True)
    memory = (1 << 30) if args.quick else (3 << 30)
    # The in-place store lives on tmpfs (DRAM, like the memory store next to it): on disk,
    # the page cache had dropped its chunk files by the time it was read, after every other
    # system had written its own copy of the data.
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    if args.buffers == "huge":
        shm = _mount_huge_tmpfs(work / "huge-tmpfs")
    elif args.buffers == "disk":
        shm = work / "disk-buffers"
        shm.mkdir(exist_ok=True)
    dir_store = Path(tempfile.mkdtemp(prefix="bench-dataloader-store-", dir=shm))
    with (
        contextlib.ExitStack() as cleanup,
        LocalCluster(2, memory=memory, workdir=work / "cluster") as cluster,
        LocalCluster(2, directory=dir_store, workdir=work / "cluster-dir") as on_disk,
    ):
        cleanup.callback(shutil.rmtree, dir_store, True)
        assert cluster.spec is not None and on_disk.spec is not None
        cluster.spec.save(work / "cluster.json")
        on_disk.spec.save(work / "cluster-dir.json")
        env = {**os.environ, "IOSVC_CLUSTER": str(work / "cluster.json"), "OMP_NUM_THREADS": "1"}
        if args.pin:
            others = os.sched_getaffinity(0) - {0}
            if not others:
                raise SystemExit("--pin needs at least 2 CPUs")
            for proc in [*cluster.procs, *on_disk.procs]:
                assert proc is not None
                for thread in os.listdir(f"/proc/{proc.pid}/task"):  # new ones inherit it
                    os.sched_setaffinity(int(thread), others)
            env[PIN_ENV] = "0"
        env_dir = {**env, "IOSVC_CLUSTER": str(work / "cluster-dir.json")}
        # The same servers, every read through gRPC instead of the data port (iosvc.dataplane)
        env_grpc = {**env, "IOSVC_DATA_PLANE": "0"}
        # Readers reuse memory in a tmpfs directory of this run's own (slot files for remote
        # shards, batch arenas: dataloaders._slots, _arena); the *-private systems do not.
        slot_dir = tempfile.mkdtemp(prefix="bench-dataloader-slots-", dir=shm)
        cleanup.callback(shutil.rmtree, slot_dir, True)
        for e in (env, env_dir, env_grpc):
            e["DATALOADERS_BUFFER_DIR"] = os.path.join(slot_dir, "slots")
        env_private = {**env, "DATALOADERS_BUFFER_DIR": ""}
        for dataset in args.datasets:
            n = n_by_dataset[dataset]
            results[dataset] = {}
            local_copy: Path | None = None
            for system in args.systems:
                cell: dict[str, Any] = dict.fromkeys(
                    (
                        "samples_per_s",
                        "mb_per_s",
                        "first_batch_s",
                        "peak_rss_bytes",
                        "bytes_on_disk",
                    )
                )
                cell["error"] = None
                python = sys.executable
                if system in PEERS:
                    if peer_python is None:
                        cell["error"] = peer_error
                        results[dataset][system] = cell
                        print(f"{dataset:7} {system:19} {peer_error}", flush=True)
                        continue
                    python = peer_python
                if system in CEILINGS and local_copy is None:  # they read iosvc-local's copy
                    cell["error"] = "not run: needs iosvc-local's copy (run iosvc-local too)"
                    results[dataset][system] = cell
                    print(f"{dataset:7} {system:19} {cell['error']}", flush=True)
                    continue
                location = (
                    f"iosvc://bench/{dataset}/{system}"
                    if system in REMOTE
                    else str(local_copy)
                    if system in CEILINGS
                    else str(work / dataset / system)
                )
                env_of = {
                    "iosvc-remote-dir": env_dir,
                    "iosvc-remote-grpc": env_grpc,
                    "iosvc-remote-private": env_private,
                    "iosvc-local-private": env_private,
                }.get(system, env)
                try:
                    if system in CEILINGS:
                        cell["bytes_on_disk"] = du(Path(location))
                    else:
                        t = time.perf_counter()
                        written = _run_child(
                            python,
                            ["write", system, dataset, str(n), location],
                            env_of,
                            timeout=3600,
                        )
                        cell["write_s"] = time.perf_counter() - t
                        cell["bytes_on_disk"] = written["bytes_on_disk"]
                        subprocess.run(["sync"], check=False)
                    if system == "iosvc-remote-cached":
                        # A fresh node cache, filled by one epoch (the first epoch of a
                        # run on a node), then the measured epochs read it.
                        SlotDirectory(env["DATALOADERS_BUFFER_DIR"]).clear()
                        fill = _run_child(
                            python, ["read", system, dataset, str(n), location], env_of, 3600
                        )
                        cell["fill_samples_per_s"] = fill["samples_per_s"]
                        cell["fill_first_batch_s"] = fill["first_batch_s"]
                        cell["fill_cpu_s"] = fill["cpu_s"]
                    # REPEATS epochs in fresh processes: the cell is the median one (by
                    # samples/s; this VM's rates move by 20-30% from run to run). Each
                    # iosvc:// epoch right after an iosvc-local one (same buffer directory):
                    # the ratio of each such pair is taken in the same seconds, so the
                    # drift of the machine's speed between cells cancels out.
                    paired = (system in REMOTE or system in CEILINGS) and local_copy is not None
                    runs, local_runs = [], []
                    for _ in range(args.repeats):
                        if paired:
                            local_runs.append(
                                _run_child(
                                    python,
                                    ["read", "iosvc-local", dataset, str(n), str(local_copy)],
                                    env,
                                    timeout=3600,
                                )
                            )
                        runs.append(
                            _run_child(
                                python,
                                ["read", system, dataset, str(n), location],
                                env_of,
                                timeout=3600,
                            )
                        )
                    if paired:
                        locals_ = [b["samples_per_s"] for b in local_runs]
                        pairs = zip(runs, locals_, strict=True)
                        ratios = [r["samples_per_s"] / b for r, b in pairs]
                        cell["paired_local_samples_per_s_runs"] = locals_
                        cell["paired_ratios_to_local"] = ratios
                        cell["paired_ratio_to_local"] = statistics.median(ratios)
                        # The same pairs without start-up (the first batch): streaming alone.
                        after = [
                            r["after_first_samples_per_s"] / b["after_first_samples_per_s"]
                            for r, b in zip(runs, local_runs, strict=True)
                        ]
                        cell["paired_after_first_ratios_to_local"] = after
                        cell["paired_after_first_ratio_to_local"] = statistics.median(after)
                    runs.sort(key=lambda r: float(r["samples_per_s"]))
                    cell.update(runs[len(runs) // 2])
                    cell["samples_per_s_runs"] = [r["samples_per_s"] for r in runs]
                    cell["cpu_s_runs"] = [r["cpu_s"] for r in runs]
                    if cell["samples"] < n:
                        cell["error"] = f"read {cell['samples']} of {n} samples"
                    # A first batch takes 0.05-0.2 s, within the noise of one sample on a
                    # shared VM: the figure is the median of the epochs' and PROBES more
                    # fresh processes that stop at their first batch.
                    probes = [r["first_batch_s"] for r in runs] + [
                        _run_child(
                            python,
                            ["first", system, dataset, str(n), location],
                            env_of,
                            timeout=600,
                        )["first_batch_s"]
                        for _ in range(PROBES)
                    ]
                    cell["first_batch_probes_s"] = probes
                    cell["first_batch_s"] = statistics.median(probes)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    cell["error"] = str(exc)
                results[dataset][system] = cell
                print(_row(dataset, system, cell), flush=True)
                if system == "iosvc-local" and cell.get("samples_per_s"):
                    local_copy = work / dataset / system  # kept: the pairs' baseline
                elif system in CEILINGS:
                    pass  # it read iosvc-local's copy
                elif system not in REMOTE:
                    shutil.rmtree(work / dataset / system, ignore_errors=True)
                else:  # the DRAM stores hold one copy at a time (6 GiB for 4 copies of 2 GB)
                    spec = on_disk.spec if system == "iosvc-remote-dir" else cluster.spec
                    with Client(spec) as client:
                        client.rm(f"bench/{dataset}/{system}", recursive=True)
                    SlotDirectory(env["DATALOADERS_BUFFER_DIR"]).clear()  # its node cache
            if local_copy is not None:
                shutil.rmtree(local_copy, ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, n_by_dataset))
    if args.json:
        doc = {
            "benchmark": "dataloader",
            "quick": args.quick,
            "batch_size": BATCH,
            "num_workers": WORKERS,
            "buffers": args.buffers,
            "pinned": args.pin,
            "repeats": args.repeats,
            "samples": n_by_dataset,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_at_start": load_start,
                "loadavg_at_end": os.getloadavg(),
            },
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


def _row(dataset: str, system: str, cell: dict[str, Any]) -> str:
    if cell.get("samples_per_s") is None:
        return f"{dataset:7} {system:19} error: {cell['error']}"
    return (
        f"{dataset:7} {system:19} {cell['samples_per_s']:>10,.0f} {cell['mb_per_s']:>8,.0f} "
        f"{cell['first_batch_s']:>7.2f} {cell['peak_rss_bytes'] / 2**20:>8,.0f} "
        f"{cell['bytes_on_disk'] / 2**20:>9,.1f} {cell.get('cpu_s') or 0:>6.1f}"
        + (f"  ({cell['error']})" if cell.get("error") else "")
    )


def table(results: dict[str, dict[str, dict[str, Any]]], n_by_dataset: dict[str, int]) -> str:
    lines = [
        f"{'dataset':7} {'system':19} {'samples/s':>10} {'MB/s':>8} {'1st (s)':>7} "
        f"{'RSS MiB':>8} {'disk MiB':>9} {'CPU s':>6}  ratios"
    ]
    for dataset, cells in results.items():
        ok = {s: c for s, c in cells.items() if c.get("samples_per_s")}
        peers = [c["samples_per_s"] for s, c in ok.items() if s in PEERS | OTHER_PEERS]
        best_peer = max(peers) if peers else None
        local = ok.get("iosvc-local", {}).get("samples_per_s")
        for system, cell in cells.items():
            row = _row(dataset, system, cell)
            if system == "iosvc-local" and best_peer and local:
                row += f"  {local / best_peer:.2f}x best peer"
            if (
                system != "iosvc-local"
                and (system.startswith("iosvc") or system in CEILINGS)
                and local
                and cell.get("samples_per_s")
            ):
                row += f"  {cell['samples_per_s'] / local:.2f}x iosvc-local"
                if cell.get("paired_ratio_to_local"):
                    row += f" ({cell['paired_ratio_to_local']:.2f}x paired"
                    after = cell.get("paired_after_first_ratio_to_local")
                    row += f", {after:.2f}x after the first batch)" if after else ")"
            lines.append(row)
            if cell.get("fill_samples_per_s"):
                lines.append(
                    f"{'':27} its first epoch, filling the node cache: "
                    f"{cell['fill_samples_per_s']:,.0f} samples/s, first batch "
                    f"{cell['fill_first_batch_s']:.2f} s"
                    + (f" ({cell['fill_samples_per_s'] / local:.2f}x iosvc-local)" if local else "")
                )
        raw = n_by_dataset[dataset] * (64 * 64 * 4 if dataset == "arrays" else 10 * 1024)
        if dataset == "arrays" and ok.get("iosvc-local", {}).get("bytes_on_disk"):
            disk = ok["iosvc-local"]["bytes_on_disk"]
            lines.append(f"{'':27} arrays on disk: {disk / raw:.2f}x raw size")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
