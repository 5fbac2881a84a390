"""Who is asking: the job identity every request carries.

In open mode (the embedded single-user default) the client declares its identity from the
environment, like ThemisIO does: Slurm's variables first, then the process's uid/gid, and the
``IOSVC_*`` variables override both so tests and benchmarks can play many jobs on one machine.
In secure mode the identity comes from a signed job token instead (see the token functions
below): the server trusts the token alone.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

__all__ = [
    "JobIdentity",
    "TokenClaims",
    "issue_token",
    "load_key_file",
    "new_key_file",
    "read_claims",
    "token_from_env",
    "verify_token",
]

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


# ----------------------------------------------------------------- job tokens
#
# A token is ``<claims>.<mac>``, both base64url without padding: ``claims`` is msgpack of
# ``{"v": 1, "j": job, "u": user, "g": group, "n": nodes, "exp": unix time, "adm": bool}`` and
# ``mac`` is HMAC-SHA256 of the encoded claims under the cluster key. Minted by root (a Slurm
# prolog or ``iosvc token issue``), verified by every server; the identity the scheduler uses
# comes from the token alone in secure mode.

_TOKEN_VERSION = 1
KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says: who, until when, and whether it may administer."""

    identity: JobIdentity
    expires: float
    admin: bool = False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(key: bytes, identity: JobIdentity, ttl: float, *, admin: bool = False) -> str:
    """Mint a token for ``identity`` valid for ``ttl`` seconds."""
    if len(key) < 16:
        raise ValueError("cluster key too short")
    if ttl <= 0:
        raise ValueError("token lifetime must be positive")
    claims = {
        "v": _TOKEN_VERSION,
        "j": identity.job_id,
        "u": identity.user,
        "g": identity.group,
        "n": identity.nodes,
        "exp": time.time() + ttl,
        "adm": admin,
    }
    body = _b64(msgpack.packb(claims, use_bin_type=True))
    mac = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


def read_claims(token: str) -> TokenClaims:
    """Decode a token's claims WITHOUT verifying it (for display on the client side)."""
    from iosvc.errors import Unauthenticated

    try:
        body, _, _ = token.strip().partition(".")
        data = msgpack.unpackb(_unb64(body), raw=False)
        identity = JobIdentity(data["j"], data["u"], data["g"], data["n"])
        return TokenClaims(identity, float(data["exp"]), bool(data.get("adm", False)))
    except Exception:
        raise Unauthenticated("malformed job token") from None


def verify_token(key: bytes, token: object, now: float | None = None) -> TokenClaims:
    """Check a token's signature and lifetime; ``Unauthenticated`` for anything wrong."""
    from iosvc.errors import Unauthenticated

    if not isinstance(token, str) or token.count(".") != 1 or len(token) > 4096:
        raise Unauthenticated("missing or malformed job token (set IOSVC_TOKEN)")
    body, mac = token.split(".")
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac, expected):
        raise Unauthenticated("job token signature does not match this cluster's key")
    claims = read_claims(token)
    if claims.expires < (time.time() if now is None else now):
        raise Unauthenticated(f"job token of job {claims.identity.job_id} has expired")
    return claims


def new_key_file(path: str | os.PathLike[str]) -> bytes:
    """Create a fresh random cluster key readable only by its owner (mode 0600)."""
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def load_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a cluster key; refuse one that others can read (it signs every identity)."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError(
            f"cluster key {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            f"chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except ValueError:
        raise ValueError(f"cluster key {path} is not hex") from None
    if len(key) < 16:
        raise ValueError(f"cluster key {path} is too short")
    return key


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The job token of this process: ``IOSVC_TOKEN``, else the file ``IOSVC_TOKEN_FILE``."""
    env = os.environ if environ is None else environ
    token = env.get("IOSVC_TOKEN")
    if token:
        return token.strip()
    path = env.get("IOSVC_TOKEN_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return None
