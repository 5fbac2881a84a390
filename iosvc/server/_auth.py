"""Who is asking and what they may touch.

Open mode (no cluster key; the embedded single-user default): the identity a client declares
is taken as is and everyone may do everything, as with ThemisIO. Secure mode (a cluster key):
every request must carry a job token signed with the key; the identity comes from the token
alone, a declared identity that differs is refused, and paths are authorised:

- a user reads and writes under ``<user>/``;
- everyone reads published datasets under ``datasets/``; only admins write there;
- admins (tokens minted with ``--admin``) may do anything, including policy changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from iosvc.errors import InvalidArgument, PermissionDenied
from iosvc.identity import JobIdentity, issue_token, verify_token

__all__ = ["DATASETS", "Authorizer", "Caller"]

#: Top-level prefix of published, read-only datasets.
DATASETS = "datasets"


@dataclass(frozen=True, slots=True)
class Caller:
    identity: JobIdentity
    admin: bool


class Authorizer:
    """Authentication and path authorisation of one server."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self._server_token: tuple[str, float] | None = None

    @property
    def secure(self) -> bool:
        return self.key is not None

    def caller(self, header: dict[str, Any]) -> Caller:
        """Authenticate a request header."""
        declared = header.get("id")
        if self.key is None:
            try:
                return Caller(JobIdentity.from_wire(declared), admin=True)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(f"request identity: {exc}") from None
        claims = verify_token(self.key, header.get("tok"))
        if declared is not None and declared != claims.identity.to_wire():
            raise PermissionDenied(
                f"declared identity {declared} does not match the job token "
                f"({claims.identity}); a job cannot claim more than its token says"
            )
        return Caller(claims.identity, claims.admin)

    def require_admin(self, caller: Caller, what: str) -> None:
        if not caller.admin:
            raise PermissionDenied(f"{what} needs an admin token (user {caller.identity.user})")

    def may_read(self, caller: Caller, path: str) -> None:
        if caller.admin or _under(path, caller.identity.user) or _under(path, DATASETS):
            return
        raise PermissionDenied(f"user {caller.identity.user} may not read {path}")

    def may_write(self, caller: Caller, path: str) -> None:
        if caller.admin or path.startswith(caller.identity.user + "/"):
            return
        if _under(path, DATASETS):
            raise PermissionDenied(f"{path} is a published dataset: read-only for users")
        raise PermissionDenied(
            f"user {caller.identity.user} may write only under {caller.identity.user}/, not {path}"
        )

    def visible(self, caller: Caller, path: str) -> bool:
        """Whether a listing may show ``path`` to the caller."""
        return caller.admin or _under(path, caller.identity.user) or _under(path, DATASETS)

    def server_token(self) -> str | None:
        """An admin token for server-to-server calls (re-minted before it expires)."""
        if self.key is None:
            return None
        now = time.time()
        if self._server_token is None or self._server_token[1] < now + 60:
            who = JobIdentity("iosvc-server", "root", "root", 1)
            self._server_token = (issue_token(self.key, who, 3600, admin=True), now + 3600)
        return self._server_token[0]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")
