"""Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Used by the multi-host tests and ``bench/scaling.py`` (root and iproute2 needed). Names carry
this process id and addresses a random 10.x.y.0/24, so concurrent runs do not collide; the
namespaces, their links and the bridge are removed on exit, also after a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["NetnsHosts", "netns_available"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"iosvcprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetnsHosts:
    """``count`` hosts with addresses on one private subnet.

    Parameters
    ----------
    count
        Number of hosts (namespaces).
    """

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.count = count
        self.names = [f"iosvc{tag}h{i}" for i in range(count)]
        self.tag = tag
        self.bridge = f"iosbr{tag}"[:15]
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.addresses = [f"{self.subnet}.{i + 1}" for i in range(count)]
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetnsHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names):
                outer, inner = self._veth(i, "o"), self._veth(i, "i")
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge, "up")
                self.exec(i, ["ip", "addr", "add", f"{self.addresses[i]}/24", "dev", inner])
                self.exec(i, ["ip", "link", "set", inner, "up"])
                self.exec(i, ["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _veth(self, i: int, end: str) -> str:
        # The whole tag, not a prefix of the bridge name: two test processes whose pids
        # shared their first digits made the same veth names, and one of them failed.
        return f"iv{self.tag}{end}{i}"

    def exec(self, i: int, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in host ``i`` and wait; raises on failure."""
        return subprocess.run(
            ["ip", "netns", "exec", self.names[i], *cmd], capture_output=True, text=True, check=True
        )

    def spawn(self, i: int, cmd: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in host ``i``; stopped (killed) on exit at the latest."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd], **popen)
        self._procs.append(proc)
        return proc

    def link(self, i: int, up: bool) -> None:
        """Take host ``i`` off the network (its link down) or back on."""
        self.exec(i, ["ip", "link", "set", self._veth(i, "i"), "up" if up else "down"])

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for ns in self.names:
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
        for i in range(self.count):
            _ip("link", "del", self._veth(i, "o"), check=False)
        _ip("link", "del", self.bridge, check=False)
