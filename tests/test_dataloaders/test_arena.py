"""Batch arenas: numeric batch fields in reused slots of a worker's arena file
(dataloaders._arena), never overwritten while the main process can still read them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataloaders import DataLoader, StreamingDataset, write_shards
from dataloaders._arena import _READER, ArenaRef, BatchArena, batch_bytes, open_batch
from dataloaders._huge import HUGE_PAGE, _address, huge_bytes
from dataloaders._slots import SlotDirectory

from .helpers import needs_collapse, tmpfs

ROOT = Path(__file__).resolve().parents[2]
N = 600
BATCH = 16


def _samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    return [{"x": rng.normal(size=(8, 4)).astype(np.float32), "y": i, "f": i / 4} for i in range(N)]


@pytest.fixture
def arrays_url(local_url: str) -> str:
    write_shards(_samples(), local_url, format="arrays", shard_bytes=8 << 10)
    return local_url


def _arenas(buffer_dir: str) -> list[str]:
    if not os.path.isdir(buffer_dir):
        return []
    return sorted(n for n in os.listdir(buffer_dir) if n.startswith("batch-"))


def _check(batch: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    for row, i in enumerate(batch["y"].tolist()):
        assert np.array_equal(batch["x"][row].numpy(), samples[i]["x"])
        assert float(batch["f"][row]) == samples[i]["f"]


def test_batches_held_by_the_user_are_never_overwritten(arrays_url: str, buffer_dir: str) -> None:
    samples = _samples()
    loader = DataLoader(StreamingDataset(arrays_url, seed=2), batch_size=BATCH, num_workers=2)
    held = list(loader)  # every batch of the epoch alive at once: far more than the slots
    assert sum(len(b["y"]) for b in held) == N
    for batch in held:
        assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64
        assert batch["f"].dtype == torch.float64 and batch["x"].shape[1:] == (8, 4)
        _check(batch, samples)
    assert _arenas(buffer_dir), "the workers used no arena"


def test_slots_are_reused_and_a_batch_kept_across_epochs_survives(
    arrays_url: str, buffer_dir: str
) -> None:
    samples = _samples()
    loader = DataLoader(StreamingDataset(arrays_url, seed=3), batch_size=BATCH, num_workers=2)
    kept = None
    for _ in range(3):  # new workers each epoch; the previous epoch's last batch still held
        for batch in loader:
            _check(batch, samples)
            kept = batch
        assert kept is not None
        _check(kept, samples)
        sizes = {
            name: os.path.getsize(os.path.join(buffer_dir, name)) for name in _arenas(buffer_dir)
        }
        # 38 batches of each epoch through a handful of slots; files only for the workers
        # (and one more where a held batch kept a file from the next epoch's workers).
        assert 1 <= len(sizes) <= 4
        assert all(size < 1 << 20 for size in sizes.values())


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
def test_pinned_batches_do_not_use_arenas(arrays_url: str) -> None:
    loader = DataLoader(
        StreamingDataset(arrays_url, seed=2), batch_size=BATCH, num_workers=2, pin_memory=True
    )
    assert not loader.dataset._batch_arenas
    first = next(iter(loader))
    assert isinstance(first["x"], torch.Tensor) and first["x"].shape == (BATCH, 8, 4)


def test_a_slot_is_free_again_only_when_every_view_of_its_batch_is_gone(
    tmp_path: Path,
) -> None:
    arena = BatchArena(SlotDirectory(str(tmp_path / "slots"), budget=64 << 20), count=2)
    fields = [((4, 2), np.dtype("float32")), ((4,), np.dtype("<i8"))]
    nbytes = batch_bytes(fields)

    def send(value: int) -> dict[str, Any]:
        slot = arena.batch(nbytes)
        assert slot is not None
        x, xref = slot.array(*fields[0])
        y, yref = slot.array(*fields[1])
        x[:] = value
        y[:] = value
        return {"x": xref, "y": yref, "s": "kept as it is"}

    a = open_batch(send(1))
    b = open_batch(send(2))
    assert a["s"] == "kept as it is" and int(a["y"].sum()) == 4 and int(b["y"].sum()) == 8
    assert arena.batch(nbytes) is None  # both slots held: the caller uses plain memory
    view = a["x"][1:]  # a view keeps a's slot
    del a
    assert arena.batch(nbytes) is None
    del view
    c = open_batch(send(3))  # a's slot again
    assert float(c["x"].sum()) == 24.0 and int(b["y"].sum()) == 8  # b untouched
    del b, c


@needs_collapse
def test_arenas_on_a_tmpfs_without_huge_pages_are_mapped_in_them_by_both_sides(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "plain", "size=64m,mode=0700") as mount:
        arena = BatchArena(SlotDirectory(str(mount / "slots"), budget=48 << 20), count=2)
        fields: list[tuple[tuple[int, ...], np.dtype[Any]]] = [((1024, 1024), np.dtype("f4"))]
        slot = arena.batch(batch_bytes(fields))  # 4 MiB batches
        assert slot is not None
        x, ref = slot.array(*fields[0])
        x[:] = np.arange(1024, dtype=np.float32)
        assert huge_bytes([ref.path]) >= 8 << 20  # two 4 MiB slots (and headroom)
        assert _address(slot._buf) % HUGE_PAGE == 0  # the worker's mapping
        batch = open_batch({"x": ref})
        assert torch.equal(batch["x"][7], torch.arange(1024, dtype=torch.float32))
        reader = _READER._files[(ref.path, ref.inode)][1]
        assert _address(reader) % HUGE_PAGE == 0  # the main process's mapping
        del batch, reader


def test_a_batch_whose_slot_was_claimed_again_is_an_error(tmp_path: Path) -> None:
    slots = SlotDirectory(str(tmp_path / "slots"), budget=64 << 20)
    arena = BatchArena(slots, count=2)
    slot = arena.batch(4096)
    assert slot is not None
    _, ref = slot.array((16,), np.dtype("<i8"))
    forged = ArenaRef(
        ref.path, ref.inode, ref.token ^ 1, ref.slot, ref.offset, ref.shape, ref.dtype
    )
    with pytest.raises(RuntimeError, match="claimed by another reader"):
        open_batch({"y": forged})
    assert open_batch({"y": ref})["y"].shape == (16,)


def test_a_killed_main_process_frees_the_slots_it_held(arrays_url: str, buffer_dir: str) -> None:
    """The read locks of a main process die with it: the next reader reuses its arenas."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from dataloaders import DataLoader, StreamingDataset
        loader = DataLoader(StreamingDataset({arrays_url!r}, seed=2), batch_size={BATCH},
                            num_workers=2)
        held = list(loader)  # holds every slot it was sent
        print("held", flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "DATALOADERS_BUFFER_DIR": buffer_dir}
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _arenas(buffer_dir)
        assert before
        holder.kill()
        holder.wait(10)
        samples = _samples()
        loader = DataLoader(StreamingDataset(arrays_url, seed=2), batch_size=BATCH, num_workers=2)
        for batch in loader:
            _check(batch, samples)
        assert _arenas(buffer_dir) == before  # reused, none created
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_growing_blob_batches_and_a_new_slot_layout_never_touch_held_batches(
    local_url: str, buffer_dir: str
) -> None:
    """Blob batches grow past an arena's slots (the worker takes a larger file), and a
    later loader lays the same files out in other slots: held batches stay intact."""
    blobs = [os.urandom(50 + i * 40) for i in range(400)]  # later batches far larger
    write_shards(
        [{"b": blob, "y": i} for i, blob in enumerate(blobs)], local_url, shard_bytes=64 << 10
    )

    def epoch(batch: int) -> list[dict[str, Any]]:
        ds = StreamingDataset(local_url, shuffle=False)
        return list(DataLoader(ds, batch_size=batch, num_workers=2))

    def check(batches: list[dict[str, Any]]) -> None:
        seen = []
        for b in batches:
            assert all(isinstance(x, bytes) for x in b["b"])
            for i, blob in zip(b["y"].tolist(), b["b"], strict=True):
                assert blob == blobs[i]
                seen.append(i)
        assert sorted(seen) == list(range(400))

    held = epoch(16)
    check(held)
    assert len(_arenas(buffer_dir)) > 2  # outgrown arenas were replaced by larger ones
    check(epoch(40))  # the same files, other slot sizes
    check(held)


def test_an_arena_deleted_and_made_again_under_its_name_is_read_as_the_new_file(
    arrays_url: str, buffer_dir: str
) -> None:
    """The main process keeps arena files open; one deleted meanwhile (idle clean-up,
    `iosvc shards buffers --clear`) and made again by the next workers is another file."""
    samples = _samples()
    loader = DataLoader(StreamingDataset(arrays_url, seed=4), batch_size=BATCH, num_workers=2)
    held = list(loader)
    names = _arenas(buffer_dir)
    assert names
    SlotDirectory(buffer_dir).clear()  # no worker holds them: deleted, batches still held
    assert _arenas(buffer_dir) == []
    again = list(loader)  # new workers make files of the same names
    remade = _arenas(buffer_dir)
    assert remade and set(remade) <= set(names)
    for batch in [*held, *again]:
        _check(batch, samples)


def test_without_a_buffer_dir_batches_come_in_plain_shared_memory(
    arrays_url: str, buffer_dir: str
) -> None:
    before = _arenas(buffer_dir)
    samples = _samples()
    ds = StreamingDataset(arrays_url, seed=6, buffer_dir=None)
    batches = list(DataLoader(ds, batch_size=BATCH, num_workers=2))
    assert sum(len(b["y"]) for b in batches) == N
    for batch in batches:
        assert batch["x"].is_shared()  # PyTorch's own segments, as before arenas
        _check(batch, samples)
    assert _arenas(buffer_dir) == before  # no arena made or claimed anew
