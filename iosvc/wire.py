"""Wire format: gRPC generic handlers carrying raw bytes.

Every gRPC message is one frame::

    [u32 little-endian header length][msgpack header][raw payload]

No protobuf on the data path: raw bytes measured 1.7-4.7x faster than protobuf ``bytes`` fields
on this hardware (shared/reference/machine_limits.md, section 4). The header carries the method
arguments and the caller's identity; the payload carries file bytes untouched.

Methods of service ``iosvc.v1.Io``:

``Call``        unary-unary: one operation or a batch of small ones (``op`` in the header).
``ReadChunks``  unary-stream: a list of chunk ranges in, one frame per chunk out.
``WriteChunks`` stream-unary: one frame per chunk in, one summary out.

Errors cross the boundary as a gRPC status plus the exact class name in the ``iosvc-error``
trailing metadata (see :mod:`iosvc.errors`); :func:`error_from_rpc` maps them back.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Any

import grpc
import msgpack

from iosvc.errors import ERROR_BY_CODE, ERROR_BY_NAME, InvalidArgument, IosvcError

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_CHUNK_SIZE",
    "ERROR_METADATA_KEY",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "METHOD_CALL",
    "METHOD_READ",
    "METHOD_WRITE",
    "SERVICE",
    "aio_channel",
    "channel_credentials",
    "error_from_rpc",
    "pack",
    "server_credentials",
    "sync_channel",
    "unpack",
]

SERVICE = "iosvc.v1.Io"
METHOD_CALL = f"/{SERVICE}/Call"
METHOD_READ = f"/{SERVICE}/ReadChunks"
METHOD_WRITE = f"/{SERVICE}/WriteChunks"

#: Default chunk (stripe) size: one 2 MiB huge page, as ThemisIO's stripes. A server on a
#: tmpfs keeps such chunk files in huge pages (``iosvc.server._stores``) that a same-host
#: reader maps whole, where 1 MiB chunk files can only be 4 KiB pages: data loaders read
#: shards in place faster (bench/README.md, "Session 10"). Large transfers were no slower
#: than with 1 MiB chunks over the data port or gRPC (``bench/results/chunk_size.json``).
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
#: Largest chunk a file may use.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
#: Largest msgpack header; batched calls of a few thousand paths fit well under it.
MAX_HEADER_SIZE = 4 * 1024 * 1024
#: Largest frame either side accepts: one max chunk or one batch, plus its header.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
ERROR_METADATA_KEY = "iosvc-error"

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    # Bulk streams: let HTTP/2 windows grow so a 4 MiB chunk is not throttled by flow control.
    ("grpc.http2.bdp_probe", 1),
    ("grpc.so_reuseport", 0),
    # Reconnect to a restarted server within ~1 s: gRPC's default backoff grows to 120 s, during
    # which calls fail at once although the server is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A peer that vanished without closing (a node down, a cut link) is noticed by keepalive
    # pings within ~15 s instead of when the call's deadline passes.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Server side: accept those pings (the default would answer them with GOAWAY).
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

_LEN = struct.Struct("<I")
_packer = msgpack.Packer(use_bin_type=True)


@functools.cache
def host_id() -> str | None:
    """Who shares this process's files: the kernel boot id and the mount namespace.

    Two processes with the same value see the same files under the same paths, so a server
    may tell a client where a chunk lies instead of sending it. None where unknown.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/mnt').st_ino}"
    except OSError:
        return None


def pack(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Build one frame from a header dict and an optional raw payload."""
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER_SIZE:
        raise InvalidArgument(f"request header is {len(head)} bytes, over {MAX_HEADER_SIZE}")
    if not payload:
        return _LEN.pack(len(head)) + head
    return b"".join((_LEN.pack(len(head)), head, payload))


def unpack(frame: bytes | bytearray) -> tuple[dict[str, Any], memoryview]:
    """Split a frame into (header, payload view); ``InvalidArgument`` if malformed."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise InvalidArgument("frame must be bytes")
    if len(frame) < 4:
        raise InvalidArgument("frame shorter than its length prefix")
    if len(frame) > MAX_MESSAGE_SIZE:
        raise InvalidArgument(f"frame of {len(frame)} bytes is over {MAX_MESSAGE_SIZE}")
    (hlen,) = _LEN.unpack_from(frame, 0)
    if hlen > MAX_HEADER_SIZE or 4 + hlen > len(frame):
        raise InvalidArgument(f"header length {hlen} does not fit the frame")
    view = memoryview(frame)
    try:
        header = msgpack.unpackb(view[4 : 4 + hlen], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise InvalidArgument(f"malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument("header must be a map")
    return header, view[4 + hlen :]


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"TLS {what} {path} is not a PEM file")
    return data


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials of a server from PEM files (certificate chain and private key)."""
    return grpc.ssl_server_credentials(
        [(_read_pem(key_file, "key"), _read_pem(cert_file, "certificate"))]
    )


def channel_credentials(ca_file: str) -> grpc.ChannelCredentials:
    """Client TLS credentials trusting the CA (or self-signed certificate) in ``ca_file``."""
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(ca_file, "CA"))


def aio_channel(address: str, tls_ca: str | None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS when a CA file is given, else plaintext."""
    if tls_ca:
        return grpc.aio.secure_channel(
            address, channel_credentials(tls_ca), options=CHANNEL_OPTIONS
        )
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def sync_channel(address: str, tls_ca: str | None) -> grpc.Channel:
    """A blocking channel to ``address`` (admin calls), TLS when a CA file is given."""
    if tls_ca:
        return grpc.secure_channel(address, channel_credentials(tls_ca), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def error_from_rpc(err: grpc.RpcError, where: str = "") -> IosvcError:
    """Turn a ``grpc.RpcError`` (sync or aio) into the matching :class:`IosvcError`."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or ""
    name = None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            name = value.decode() if isinstance(value, bytes) else value
    cls = ERROR_BY_NAME.get(name or "") or ERROR_BY_CODE.get(code.name if code else "UNKNOWN")
    if cls is None:
        cls = ERROR_BY_CODE["UNKNOWN"]
    prefix = f"{where}: " if where else ""
    if code is not None and code.name == "UNAVAILABLE" and not name:
        details = f"server unavailable ({details})" if details else "server unavailable"
        lowered = details.lower()
        if "ssl" in lowered or "handshake" in lowered or "tls" in lowered:
            details += (
                "; TLS failed: give the servers' CA with --tls-ca or IOSVC_TLS_CA (or the "
                "cluster file's tls_ca), and check it signed their certificate"
            )
        elif "socket closed" in lowered or "connection reset" in lowered:
            details += "; if the servers use TLS, give their CA with --tls-ca or IOSVC_TLS_CA"
    return cls(prefix + details)
