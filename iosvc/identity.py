"""Who is asking: the job identity every request carries.

In open mode (the embedded single-user default) the client declares its identity from the
environment, like ThemisIO does: Slurm's variables first, then the process's uid/gid, and the
``IOSVC_*`` variables override both so tests and benchmarks can play many jobs on one machine.
Secure mode (signed job tokens) builds on the same value object.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["JobIdentity"]

_MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """The job a request belongs to.

    Parameters
    ----------
    job_id
        Scheduler job id (``SLURM_JOB_ID``) or any stable name of the job.
    user, group
        Owner of the job.
    nodes
        Job size in nodes; size-fair policies weigh jobs by it.
    """

    job_id: str
    user: str
    group: str
    nodes: int = 1

    def __post_init__(self) -> None:
        for field in ("job_id", "user", "group"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
                raise ValueError(
                    f"JobIdentity.{field} must be a non-empty string of <= {_MAX_NAME} chars"
                )
            if "\x00" in value or "/" in value:
                raise ValueError(f"JobIdentity.{field} may not contain '/' or NUL: {value!r}")
        if (
            isinstance(self.nodes, bool)
            or not isinstance(self.nodes, int)
            or not 1 <= self.nodes <= 1 << 20
        ):
            raise ValueError(
                f"JobIdentity.nodes must be an integer in [1, 2**20], got {self.nodes!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobIdentity:
        """Build the identity of the current process.

        Order per field: ``IOSVC_*`` override, then Slurm's variable, then the process's
        uid/gid (job id falls back to ``local-<pid>``-free ``interactive``, nodes to 1).
        """
        env = os.environ if environ is None else environ
        uid_name = _user_name()
        job = env.get("IOSVC_JOB_ID") or env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        user = env.get("IOSVC_USER") or env.get("SLURM_JOB_USER") or uid_name
        group = env.get("IOSVC_GROUP") or _group_name()
        nodes_text = (
            env.get("IOSVC_NODES")
            or env.get("SLURM_JOB_NUM_NODES")
            or env.get("SLURM_NNODES")
            or "1"
        )
        try:
            nodes = int(nodes_text)
        except ValueError:
            raise ValueError(f"job node count must be an integer, got {nodes_text!r}") from None
        return cls(job_id=job or "interactive", user=user, group=group, nodes=nodes)

    def to_wire(self) -> list[Any]:
        """Compact form carried in every request header."""
        return [self.job_id, self.user, self.group, self.nodes]

    @classmethod
    def from_wire(cls, value: Any) -> JobIdentity:
        """Parse the header form; raises ``ValueError`` on anything malformed."""
        if not isinstance(value, list | tuple) or len(value) != 4:
            raise ValueError("identity must be [job_id, user, group, nodes]")
        job_id, user, group, nodes = value
        return cls(job_id=job_id, user=user, group=group, nodes=nodes)

    def __str__(self) -> str:
        return f"job={self.job_id} user={self.user} group={self.group} nodes={self.nodes}"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def _group_name() -> str:
    try:
        return grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return f"gid{os.getgid()}"
