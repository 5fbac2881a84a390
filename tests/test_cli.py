"""The `iosvc` command as users run it: real processes, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def iosvc(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "iosvc.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def up(tmp_path: Path) -> dict[str, str]:
    env = {"IOSVC_CLUSTER": str(tmp_path / "cluster.json")}
    iosvc("up", "--servers", "2", "--memory", "256MiB", env=env)
    yield env
    iosvc("down", env=env, check=False)


def test_up_status_put_get_ls_cat_du_rm_down(up: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(3 << 20))
    status = iosvc("status", env=up).stdout
    assert "open mode" in status and "memory" in status
    assert "data ports (bulk transfers beside gRPC): " in status

    iosvc("put", "-r", str(src), "data/", env=up)
    listing = iosvc("ls", "-l", "data/src", env=up).stdout
    assert "data/src/a.txt" in listing and "data/src/sub/" in listing
    assert iosvc("cat", "data/src/a.txt", env=up).stdout == "alpha\n"
    iosvc("get", "-r", "data/src", str(tmp_path / "back"), env=up)
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == (
        src / "sub" / "b.bin"
    ).read_bytes()
    assert "3MiB" in iosvc("du", "-s", "data", env=up).stdout

    refused = iosvc("rm", "data/src", env=up, check=False)
    assert refused.returncode == 1 and "is a directory (use -r)" in refused.stderr
    iosvc("rm", "-r", "data", env=up)
    assert iosvc("ls", env=up).stdout.strip() == ""


def test_errors_are_one_line_without_traceback(up: dict[str, str]) -> None:
    missing = iosvc("cat", "nope/missing", env=up, check=False)
    assert missing.returncode == 1
    assert "iosvc: error:" in missing.stderr and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = iosvc("ls", "a/../b", env=up, check=False)
    assert bad.returncode == 1 and "'..'" in bad.stderr and "Traceback" not in bad.stderr


def test_second_up_refused_while_running(up: dict[str, str]) -> None:
    again = iosvc("up", env=up, check=False)
    assert again.returncode == 1 and "already running" in again.stderr


def test_commands_without_a_cluster_say_how_to_start_one(tmp_path: Path) -> None:
    env = {"IOSVC_CLUSTER": str(tmp_path / "none.json")}
    proc = iosvc("status", env=env, check=False)
    assert proc.returncode == 1 and "iosvc up" in proc.stderr


def test_down_stops_every_server(tmp_path: Path) -> None:
    env = {"IOSVC_CLUSTER": str(tmp_path / "cluster.json")}
    iosvc("up", "--servers", "3", env=env)
    import json

    pids = json.loads((tmp_path / "cluster.json").read_text())["pids"]
    assert "stopped 3 iosvc servers" in iosvc("down", env=env).stdout
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "cluster.json").exists()


def test_up_with_local_dir_storage(tmp_path: Path) -> None:
    env = {"IOSVC_CLUSTER": str(tmp_path / "cluster.json")}
    iosvc("up", "--servers", "2", "--dir", str(tmp_path / "data"), env=env)
    try:
        (tmp_path / "f").write_bytes(b"persist me")
        iosvc("put", str(tmp_path / "f"), "f", env=env)
        assert "dir" in iosvc("status", env=env).stdout
        assert any((tmp_path / "data").rglob("*"))
    finally:
        iosvc("down", env=env)


def test_help_explains_commands() -> None:
    out = iosvc("--help", env={}).stdout
    for command in ("up", "down", "status", "serve", "ls", "put", "get", "cat", "rm", "du"):
        assert command in out
    assert "--device-bandwidth" in iosvc("serve", "--help", env={}).stdout


def test_up_with_a_pull_root_stages_in_through_the_servers(tmp_path: Path) -> None:
    env = {"IOSVC_CLUSTER": str(tmp_path / "cluster.json"), "COLUMNS": "400"}
    pfs = tmp_path / "pfs"
    (pfs / "ds").mkdir(parents=True)
    (pfs / "ds" / "x.bin").write_bytes(os.urandom(2 << 20))
    iosvc("up", "--servers", "2", "--memory", "64MiB", "--pull-root", str(pfs), env=env)
    try:
        assert f"stage in from their file system under: {pfs}" in iosvc("status", env=env).stdout
        put = iosvc("put", "-r", str(pfs / "ds"), "in/", env=env)
        assert "1 files read by the servers" in put.stderr
        iosvc("get", "in/ds/x.bin", str(tmp_path / "back.bin"), env=env)
        assert (tmp_path / "back.bin").read_bytes() == (pfs / "ds" / "x.bin").read_bytes()
    finally:
        iosvc("down", env=env)
