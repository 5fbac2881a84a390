"""Staging with the fsspec backend on real directories and a real local iosvc cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iosvc.client import Client
from iosvc.config import ClusterSpec
from iosvc.errors import InvalidArgument, NotFound
from iosvc.staging import Catalog, Stager, TransferFailed, load_sites

from .conftest import World, make_dataset

MiB = 1 << 20


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_register_then_stage_makes_a_verified_identical_replica(world: World) -> None:
    content = make_dataset(world.site_dir("alpha") / "climate/v1")
    record = world.stager.register("climate/v1", name="climate", site="alpha")
    assert (record.version, len(record.files)) == (1, len(content))
    assert all(f.checksum.startswith("xxh3_128:") for f in record.files)

    [result] = world.stager.stage("climate", to="beta")
    assert result.state == "verified" and result.path == "climate/v1"
    assert result.files_copied == len(content) and result.files_skipped == 0
    assert result.bytes_copied == sum(len(v) for v in content.values())
    assert tree(world.site_dir("beta") / "climate/v1") == content
    states = {r.site: r.state for r in world.catalog.replicas("climate")}
    assert states == {"alpha": "verified", "beta": "verified"}
    [task] = world.catalog.tasks("climate")
    assert task.state == "succeeded" and task.submission_id and task.task_id
    assert task.bytes_done == task.bytes_total == result.bytes_copied


def test_stage_to_another_path_and_from_a_chosen_site(world: World) -> None:
    make_dataset(world.site_dir("alpha") / "ds", files=5, large=0)
    world.stager.register("ds", name="ds", site="alpha")
    world.stager.stage("ds", to="beta", path="copies/ds")
    [result] = world.stager.stage("ds", to="gamma", source="beta")
    # Same path as its source replica unless --path says otherwise.
    assert tree(world.site_dir("gamma") / "copies/ds") == tree(world.site_dir("alpha") / "ds")
    assert (result.site, result.path) == ("gamma", "copies/ds")
    assert world.catalog.tasks("ds")[0].source == "beta"


def test_register_again_makes_a_new_version_only_when_files_change(world: World) -> None:
    make_dataset(world.site_dir("alpha") / "ds", files=3, large=0)
    assert world.stager.register("ds", name="ds", site="alpha").version == 1
    assert world.stager.register("ds", name="ds", site="alpha").version == 1
    (world.site_dir("alpha") / "ds/extra.txt").write_text("more")
    assert world.stager.register("ds", name="ds", site="alpha").version == 2
    assert world.catalog.dataset("ds", 1).files != world.catalog.dataset("ds").files


def test_failed_stage_resumes_copying_only_what_is_missing(world: World) -> None:
    """A stage that stopped part-way (here: one unreadable-as-registered source file) leaves
    the files it copied; staging again skips them and copies the rest."""
    content = make_dataset(world.site_dir("alpha") / "ds", files=30, large=1)
    world.stager.register("ds", name="ds", site="alpha")
    victim = world.site_dir("alpha") / "ds/part-1/f012.bin"
    victim.write_bytes(b"changed after registration")
    with pytest.raises(TransferFailed, match=r"part-1/f012\.bin"):
        world.stager.stage("ds", to="beta")
    assert world.catalog.replica("ds", 1, "beta").state == "failed"  # type: ignore[union-attr]
    assert not (world.site_dir("beta") / "ds/part-1/f012.bin").exists()  # never copied bad

    victim.write_bytes(content["part-1/f012.bin"])
    [result] = world.stager.stage("ds", to="beta")
    assert (result.files_copied, result.files_skipped) == (1, len(content) - 1)
    assert tree(world.site_dir("beta") / "ds") == content


def test_killed_stage_is_taken_over_and_resumed(world: World) -> None:
    """kill -9 of `iosvc stage` mid-copy: the next stage sees its owner is dead, takes the
    replica over at once, and copies only what is missing."""
    for i in range(6):
        path = world.site_dir("alpha") / f"big/{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(48 * MiB))
    world.stager.register("big", name="big", site="alpha")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iosvc.cli", "stage", "big", "--to", "beta"],
        env=world.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    with Catalog(world.catalog_file) as cat:
        while time.monotonic() < deadline:
            tasks = cat.tasks("big")
            if tasks and tasks[0].bytes_done > 0:
                break
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Catalog(world.catalog_file) as cat:
        assert cat.replica("big", 1, "beta").state == "transferring"  # type: ignore[union-attr]
    [result] = world.stager.stage("big", to="beta")
    assert result.state == "verified"
    assert result.files_copied < 6 or result.files_skipped == 0
    assert tree(world.site_dir("beta") / "big") == tree(world.site_dir("alpha") / "big")


def test_corrupted_destination_is_detected_and_repaired(world: World) -> None:
    content = make_dataset(world.site_dir("alpha") / "ds", files=20, large=1)
    world.stager.register("ds", name="ds", site="alpha")
    world.stager.stage("ds", to="beta")
    big = world.site_dir("beta") / "ds/large/big0.bin"
    data = bytearray(big.read_bytes())
    data[123_456] ^= 0xFF
    big.write_bytes(bytes(data))
    (world.site_dir("beta") / "ds/part-0/f003.bin").unlink()

    summary = world.stager.check("ds", "beta")
    assert "large/big0.bin" in summary and "part-0/f003.bin" in summary
    assert world.catalog.replica("ds", 1, "beta").state == "stale"  # type: ignore[union-attr]

    [result] = world.stager.stage("ds", to="beta")  # re-stage: re-verify and repair
    assert (result.files_copied, result.files_skipped) == (2, len(content) - 2)
    assert tree(world.site_dir("beta") / "ds") == content
    assert world.catalog.replica("ds", 1, "beta").state == "verified"  # type: ignore[union-attr]


def test_stage_into_the_burst_buffer(world: World, spec: ClusterSpec, use_cluster: str) -> None:
    content = make_dataset(world.site_dir("alpha") / "ds", files=25, large=1)
    world.stager.register("ds", name="bb-ds", site="alpha")
    results = world.stager.stage("bb-ds", to="beta", into_buffer=True)
    assert [(r.site, r.state) for r in results] == [
        ("beta", "verified"),
        ("beta:buffer", "verified"),
    ]
    assert results[1].url == "iosvc:///staging-tests/buffer/bb-ds"
    client = Client(spec)
    for rel, data in content.items():
        assert client.read(f"staging-tests/buffer/bb-ds/{rel}") == data
    # Staged again: nothing to copy, still verified (read back from the buffer).
    again = world.stager.stage("bb-ds", to="beta", into_buffer=True)
    assert [r.files_copied for r in again] == [0, 0]


def test_bad_input_gets_clear_errors(world: World) -> None:
    make_dataset(world.site_dir("alpha") / "ds", files=2, large=0)
    with pytest.raises(NotFound, match=r"unknown site 'delta'.*alpha, beta, gamma"):
        world.stager.register("ds", name="ds", site="delta")
    with pytest.raises(NotFound, match="no files under"):
        world.stager.register("nothing-here", name="x", site="alpha")
    with pytest.raises(InvalidArgument, match="dataset name"):
        world.stager.register("ds", name="a/b", site="alpha")
    with pytest.raises(NotFound, match=r"unknown dataset 'nope' \(registered: none\)"):
        world.stager.stage("nope", to="beta")
    world.stager.register("ds", name="ds", site="alpha")
    with pytest.raises(NotFound, match="no verified replica of ds v1 at gamma"):
        world.stager.stage("ds", to="beta", source="gamma")
    with pytest.raises(NotFound, match="unknown site 'mars'"):
        world.stager.stage("ds", to="mars")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no \\[sites.NAME\\] tables"),
        ("[sites.a]\nglobus_collection = 'x'", "url"),
        ("[sites.a]\nurl = '/x'\nglobus_collection = 'not-a-uuid'", "not a UUID"),
        ("[sites.a]\nurl = '/x'\nspeed = 3", "unknown field"),
        ("[sites.a]\nurl = '/x'\nglobus_path = 'relative'", "must be absolute"),
        ("[sites", "sites.toml"),
    ],
)
def test_bad_sites_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises((InvalidArgument, NotFound), match=message):
        load_sites(path)


def test_missing_sites_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="IOSVC_SITES"):
        load_sites(tmp_path / "absent.toml")


def _cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iosvc.cli", *args],
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_concurrent_stage_commands_share_one_catalog(world: World) -> None:
    for name in ("one", "two"):
        make_dataset(world.site_dir("alpha") / name, files=60, large=1)
        world.stager.register(name, name=name, site="alpha")
    commands = [
        ["stage", "one", "--to", "beta"],
        ["stage", "one", "--to", "gamma"],
        ["stage", "two", "--to", "beta"],
        ["stage", "two", "--to", "beta"],  # the same replica twice at once
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "iosvc.cli", *c],
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
    ]
    outcomes = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        outcomes.append((p.returncode, err))
    assert [rc for rc, _ in outcomes[:2]] == [0, 0], outcomes
    # The same replica twice: one stages it; the other does too (after it) or is refused.
    same = outcomes[2:]
    assert any(rc == 0 for rc, _ in same), same
    for rc, err in same:
        assert rc == 0 or "is being staged to beta by task" in err, err
    with Catalog(world.catalog_file) as cat:
        for name, site in (("one", "beta"), ("one", "gamma"), ("two", "beta")):
            assert cat.replica(name, 1, site).state == "verified"  # type: ignore[union-attr]
        assert len(cat.tasks()) >= 3


def test_cli_register_ls_show_status_and_cancel(world: World) -> None:
    make_dataset(world.site_dir("alpha") / "ds", files=4, large=0)
    out = _cli(world, "datasets", "register", "ds", "--name", "ds", "--site", "alpha")
    assert out.returncode == 0 and "registered ds v1: 4 files" in out.stdout, out.stderr
    out = _cli(world, "stage", "ds", "--to", "beta")
    assert out.returncode == 0 and "verified" in out.stdout, out.stderr
    listing = _cli(world, "datasets", "ls")
    assert "ds" in listing.stdout and "alpha, beta" in listing.stdout
    shown = _cli(world, "datasets", "show", "ds", "--files")
    assert "part-0/f000.bin" in shown.stdout and "verified" in shown.stdout
    status = _cli(world, "stage", "status", "1")
    assert "succeeded" in status.stdout, status.stderr
    cancel = _cli(world, "stage", "cancel", "1")
    assert cancel.returncode == 1 and "already succeeded" in cancel.stderr
    missing = _cli(world, "stage", "status", "99")
    assert missing.returncode == 1 and "no task 99" in missing.stderr
    unknown = _cli(world, "stage", "ds", "--to", "mars")
    assert unknown.returncode == 1 and "unknown site 'mars'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_cancel_of_a_task_whose_process_died(world: World) -> None:
    make_dataset(world.site_dir("alpha") / "ds", files=2, large=0)
    world.stager.register("ds", name="ds", site="alpha")
    number = world.catalog.add_task(
        "ds", 1, "alpha", "beta", "fsspec", bytes_total=1, files_total=1
    )
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    world.catalog._db.execute(
        "UPDATE tasks SET state = 'active', owner = ? WHERE id = ?",
        (f"{os.uname().nodename}:{dead}", number),
    )
    world.catalog.set_replica("ds", 1, "beta", "ds", "transferring")
    task = Stager(world.catalog, load_sites(world.sites_file)).cancel(number)
    assert task.state == "canceled"
    assert world.catalog.replica("ds", 1, "beta").state == "failed"  # type: ignore[union-attr]


def test_verify_transfer_mode_trusts_the_copy_but_still_reads_back_skipped_files(
    world: World,
) -> None:
    content = make_dataset(world.site_dir("alpha") / "ds", files=10, large=1)
    world.stager.register("ds", name="ds", site="alpha")
    fast = Stager(world.catalog, load_sites(world.sites_file), verify="transfer")
    [result] = fast.stage("ds", to="beta")
    assert result.state == "verified" and "hashed as copied" in result.detail
    assert tree(world.site_dir("beta") / "ds") == content
    (world.site_dir("beta") / "ds/part-0/f001.bin").write_bytes(b"rotten")
    [again] = fast.stage("ds", to="beta")
    assert (again.files_copied, again.files_skipped) == (1, len(content) - 1)
    assert tree(world.site_dir("beta") / "ds") == content
    with pytest.raises(InvalidArgument, match="verify must be"):
        Stager(world.catalog, load_sites(world.sites_file), verify="sometimes")
