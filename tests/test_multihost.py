"""Several hosts on one machine (network namespaces): one server per host, a client on another.

Servers start the way a Slurm job starts them (``iosvc serve --hostfile``, each finding its
index by its address; server 0 writes the cluster file once all answer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iosvc._netns import NetnsHosts, netns_available

why_not = netns_available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"no test hosts: {why_not}")
SERVERS = 3


class Hosts:
    def __init__(self, net: NetnsHosts, root: Path) -> None:
        self.net, self.root = net, root
        self.hostfile = root / "hosts"
        self.hostfile.write_text("".join(f"{a}\n" for a in net.addresses[:SERVERS]))
        self.cluster_file = root / "cluster.json"
        self.servers: list[subprocess.Popen[bytes] | None] = [None] * SERVERS

    def start(self, i: int) -> None:
        log = open(self.root / f"server{i}.log", "ab")  # noqa: SIM115 - closed with the process
        self.servers[i] = self.net.spawn(
            i,
            [
                sys.executable,
                "-m",
                "iosvc.cli",
                "serve",
                "--hostfile",
                str(self.hostfile),
                "--host",
                self.net.addresses[i],
                "--dir",
                str(self.root / f"data{i}"),
                "--write-cluster-file",
                str(self.cluster_file),
                "--pull-root",  # the "parallel file system" every host mounts
                str(self.root / "pfs"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def client(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` on the client host with IOSVC_CLUSTER set."""
        env = {**os.environ, "IOSVC_CLUSTER": str(self.cluster_file)}
        return subprocess.run(
            ["ip", "netns", "exec", self.net.names[SERVERS], sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    with NetnsHosts(SERVERS + 1) as net:
        h = Hosts(net, tmp_path_factory.mktemp("hosts"))
        for i in range(SERVERS):
            h.start(i)
        deadline = time.monotonic() + 60
        while not h.cluster_file.exists():
            assert time.monotonic() < deadline, (h.root / "server0.log").read_text()
            time.sleep(0.1)
        yield h


WRITE = """
import os, hashlib
from iosvc.client import Client
c = Client()
data = os.urandom(24 << 20)
c.write("mh/big", data)
assert c.read("mh/big") == data
print(hashlib.sha256(data).hexdigest())
print(sorted({c.aio.placement.chunk_server(c.aio.placement.home("mh/big"), i) for i in range(24)}))
print([s["used"] for s in c.call_all({"op": "status"})])
"""


def _write_big(hosts: Hosts) -> list[str]:
    """Writes mh/big from the client host; its digest goes to ``hosts.root / "digest"``."""
    out = hosts.client(WRITE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:3]
    (hosts.root / "digest").write_text(lines[0])
    return lines


def test_cluster_file_and_striping_across_hosts(hosts: Hosts) -> None:
    spec = json.loads(hosts.cluster_file.read_text())
    assert spec["servers"] == [f"{a}:7311" for a in hosts.net.addresses[:SERVERS]]
    # Each server's endpoints, so readers start without a gRPC call (iosvc.dataplane).
    assert [isinstance(e["data_port"], int) for e in spec["endpoints"]] == [True] * SERVERS
    assert len({e["instance"] for e in spec["endpoints"]}) == SERVERS
    _, servers, used = _write_big(hosts)
    assert servers == "[0, 1, 2]"
    assert all(u > 4 << 20 for u in json.loads(used))  # every host holds a third of the chunks


PULL = """
import os, sys
from iosvc.client import Client
c = Client()
pfs = sys.argv[1]
files = [(os.path.join(pfs, f"f{i}.bin"), f"mh/pulled/f{i}.bin") for i in range(8)]
for i, (local, _) in enumerate(files):
    with open(local, "wb") as f:
        f.write(os.urandom((i + 1) * (1 << 20) + i))
assert c.pull_probe(files[0][0]) is None, c.pull_probe(files[0][0])
assert c.pull_files(files) == {}
for local, path in files:
    assert c.read(path) == open(local, "rb").read()
print([s["pulled_bytes"] for s in c.status()])
"""


def test_servers_on_every_host_stage_in_from_the_shared_file_system(hosts: Hosts) -> None:
    (hosts.root / "pfs").mkdir(exist_ok=True)
    pfs = str(hosts.root / "pfs")
    env = {**os.environ, "IOSVC_CLUSTER": str(hosts.cluster_file)}
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.net.names[SERVERS], sys.executable, "-c", PULL, pfs],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    pulled = json.loads(out.stdout.strip())
    assert sum(pulled) == sum((i + 1) * (1 << 20) + i for i in range(8))
    assert all(p > 0 for p in pulled)  # each host read its own chunks


READ_LOOP = """
import time
from iosvc.client import Client
from iosvc.errors import IosvcError
c = Client()
print("reading", flush=True)
start = time.monotonic()
try:
    while time.monotonic() - start < 200:
        c.read("mh/big")
    print("never failed")
except IosvcError as exc:
    print(f"{type(exc).__name__} after {time.monotonic() - start:.1f}s: {exc}")
"""


def test_host_down_mid_read_fails_clearly_then_restart_brings_data_back(hosts: Hosts) -> None:
    if not (hosts.root / "digest").exists():  # the test above ran in another xdist worker
        _write_big(hosts)
    env = {**os.environ, "IOSVC_CLUSTER": str(hosts.cluster_file)}
    reader = subprocess.Popen(
        ["ip", "netns", "exec", hosts.net.names[SERVERS], sys.executable, "-c", READ_LOOP],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
    time.sleep(1.0)
    hosts.net.link(1, up=False)  # host 1 drops off the network mid-read
    start = time.monotonic()
    out, err = reader.communicate(timeout=150)
    assert time.monotonic() - start < 90, "a read hung on a dead host"
    assert "Unavailable" in out or "DeadlineExceeded" in out, (out, err)
    assert hosts.net.addresses[1] in out  # the error names the host

    # The host comes back and its server restarts from its local disk: the file is whole.
    hosts.net.link(1, up=True)
    proc = hosts.servers[1]
    assert proc is not None
    proc.kill()
    proc.wait(10)
    hosts.start(1)
    check = hosts.client(
        "import hashlib\nfrom iosvc.client import Client\n"
        "print(hashlib.sha256(Client().read('mh/big')).hexdigest())"
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == (hosts.root / "digest").read_text()
