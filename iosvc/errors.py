"""The one error tree of iosvc.

::

    IosvcError
    ├── NotFound              (FileNotFoundError)   NOT_FOUND
    ├── AlreadyExists         (FileExistsError)     ALREADY_EXISTS
    ├── IsADirectory          (IsADirectoryError)   FAILED_PRECONDITION
    ├── InvalidArgument       (ValueError)          INVALID_ARGUMENT
    ├── PermissionDenied      (PermissionError)     PERMISSION_DENIED
    │   └── ConsentRequired                         PERMISSION_DENIED
    ├── Unauthenticated       (PermissionError)     UNAUTHENTICATED
    ├── QuotaExceeded         (OSError, ENOSPC)     RESOURCE_EXHAUSTED
    ├── DataCorruption        (OSError, EIO)        DATA_LOSS
    ├── Unavailable           (ConnectionError)     UNAVAILABLE
    ├── DeadlineExceeded      (TimeoutError)        DEADLINE_EXCEEDED
    ├── Cancelled                                   CANCELLED
    ├── TransferFailed        (RuntimeError)        ABORTED
    ├── ForkedAfterGrpc       (RuntimeError)        FAILED_PRECONDITION (client side only)
    └── InternalError                               INTERNAL

Each class names its gRPC status code (``grpc_code``). The server sends the class name in the
``iosvc-error`` trailing metadata so the exact class round-trips; the status code alone maps back
through :data:`ERROR_BY_CODE`. Callers never see a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import errno

__all__ = [
    "ERROR_BY_CODE",
    "ERROR_BY_NAME",
    "AlreadyExists",
    "Cancelled",
    "ConsentRequired",
    "DataCorruption",
    "DeadlineExceeded",
    "ForkedAfterGrpc",
    "InternalError",
    "InvalidArgument",
    "IosvcError",
    "IsADirectory",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "TransferFailed",
    "Unauthenticated",
    "Unavailable",
]


class IosvcError(Exception):
    """Root of every error iosvc raises."""

    grpc_code = "UNKNOWN"

    def __init__(self, message: str = "") -> None:
        # Bypass OSError's (errno, strerror) constructor so str(err) is the message everywhere.
        Exception.__init__(self, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(IosvcError, FileNotFoundError):
    """The file or key does not exist (or is not yet committed)."""

    grpc_code = "NOT_FOUND"
    errno = errno.ENOENT


class AlreadyExists(IosvcError, FileExistsError):
    """The target exists and the operation asked it not to."""

    grpc_code = "ALREADY_EXISTS"
    errno = errno.EEXIST


class IsADirectory(IosvcError, IsADirectoryError):
    """A file operation named a directory (a prefix of other files)."""

    grpc_code = "FAILED_PRECONDITION"
    errno = errno.EISDIR


class InvalidArgument(IosvcError, ValueError):
    """Malformed request: bad path, bad header, oversized message, bad option."""

    grpc_code = "INVALID_ARGUMENT"


class PermissionDenied(IosvcError, PermissionError):
    """The identity may not do this."""

    grpc_code = "PERMISSION_DENIED"
    errno = errno.EACCES


class Unauthenticated(IosvcError, PermissionError):
    """The token is missing, forged or expired."""

    grpc_code = "UNAUTHENTICATED"
    errno = errno.EACCES


class ConsentRequired(PermissionDenied):
    """A remote service (Globus) needs the user's consent or a new login first.

    The message names the command that grants it, e.g. ``iosvc login --collection <uuid>``.
    """


class QuotaExceeded(IosvcError, OSError):
    """A server or a user is out of space (ENOSPC)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    errno = errno.ENOSPC


class DataCorruption(IosvcError, OSError):
    """A checksum did not match: the bytes are not what the writer wrote."""

    grpc_code = "DATA_LOSS"
    errno = errno.EIO


class Unavailable(IosvcError, ConnectionError):
    """A server cannot be reached (down, restarting, or never started)."""

    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(IosvcError, TimeoutError):
    """The call did not finish in time."""

    grpc_code = "DEADLINE_EXCEEDED"


class Cancelled(IosvcError):
    """The call was cancelled."""

    grpc_code = "CANCELLED"


class TransferFailed(IosvcError, RuntimeError):
    """A transfer between sites was refused or ended without copying every file."""

    grpc_code = "ABORTED"


class ForkedAfterGrpc(IosvcError, RuntimeError):
    """gRPC was in use when this process was forked: it cannot work in the child.

    gRPC's C core does not survive ``fork()`` once its threads run (any call hangs), so the
    client refuses with this error instead of hanging.
    """

    grpc_code = "FAILED_PRECONDITION"


class InternalError(IosvcError):
    """A bug or an unexpected failure inside the server."""

    grpc_code = "INTERNAL"


_ALL: tuple[type[IosvcError], ...] = (
    NotFound,
    AlreadyExists,
    IsADirectory,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    ConsentRequired,
    QuotaExceeded,
    DataCorruption,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    TransferFailed,
    ForkedAfterGrpc,
    InternalError,
)

#: Exact class by name, as sent in the ``iosvc-error`` trailing metadata.
ERROR_BY_NAME: dict[str, type[IosvcError]] = {cls.__name__: cls for cls in _ALL}
#: Default class for a bare gRPC status code name (first class listed for a code wins).
ERROR_BY_CODE: dict[str, type[IosvcError]] = {}
for _cls in _ALL:
    ERROR_BY_CODE.setdefault(_cls.grpc_code, _cls)
ERROR_BY_CODE["RESOURCE_EXHAUSTED"] = QuotaExceeded
ERROR_BY_CODE["UNKNOWN"] = InternalError
ERROR_BY_CODE["FAILED_PRECONDITION"] = IsADirectory
