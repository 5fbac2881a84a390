"""Node lists: Slurm host list expansion, hostfiles, this node's index, serve's errors."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iosvc.errors import InvalidArgument
from iosvc.server._hosts import expand_hostlist, nodes_from_slurm, own_index, read_hostfile


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("nid001", ["nid001"]),
        ("nid[001-003,007]", ["nid001", "nid002", "nid003", "nid007"]),
        ("a[1-2],b,c[09-11]", ["a1", "a2", "b", "c09", "c10", "c11"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("x[8-10]", ["x8", "x9", "x10"]),
    ],
)
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "a[1-2", "a]1", "a[2-1]", "a[x]", "a[1-999999]"])
def test_bad_hostlists_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        expand_hostlist(text)


def test_hostfile_and_own_index(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode1 slots=4\n\nnode2\nnode3  # last\n")
    nodes = read_hostfile(hostfile)
    assert nodes == ["node1", "node2", "node3"]
    assert own_index(nodes, environ={}, hostname="node2.cluster.example") == 1
    assert own_index(["10.0.0.1", "10.0.0.2"], environ={}, hostname="x", address="10.0.0.2") == 1
    slurm = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NODEID": "2"}
    assert nodes_from_slurm(slurm) == ["n1", "n2", "n3"] and own_index(nodes, environ=slurm) == 2
    with pytest.raises(InvalidArgument, match="not in the node list"):
        own_index(nodes, environ={}, hostname="elsewhere")
    with pytest.raises(InvalidArgument, match="SLURM_JOB_NODELIST"):
        nodes_from_slurm({})
    (tmp_path / "dup").write_text("a\na\n")
    with pytest.raises(InvalidArgument, match="twice"):
        read_hostfile(tmp_path / "dup")
    with pytest.raises(InvalidArgument, match="cannot read hostfile"):
        read_hostfile(tmp_path / "absent")


def test_serve_refuses_bad_node_setups_clearly(tmp_path: Path, iosvc_cli: Any) -> None:
    def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return iosvc_cli("serve", *args, env=env, timeout=60)

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\n")
    out = _serve("--slurm", env={"SLURM_JOB_NODELIST": ""})
    assert out.returncode == 1 and "needs SLURM_JOB_NODELIST" in out.stderr
    out = _serve("--hostfile", str(hosts), "--index", "3")
    assert out.returncode == 1 and "--index 3 outside" in out.stderr
    out = _serve("--hostfile", str(hosts), "--slurm")
    assert out.returncode == 1 and "not both" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve("--hostfile", str(hosts), "--port", str(port), "--index", "0")
    assert out.returncode == 1 and f"could not bind 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
