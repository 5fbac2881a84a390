"""Property-based fuzzing (hypothesis) of the wire decoder, path validation, and a live server.

Every malformed input must get a clear error (``InvalidArgument`` locally; a proper gRPC status
from the server, never INTERNAL/UNKNOWN, never a hang) and the server must keep serving.
``make test-slow`` runs the same properties with many more examples.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosvc import wire
from iosvc.client import Client
from iosvc.config import ClusterSpec
from iosvc.errors import InvalidArgument
from iosvc.placement import normalize_path, validate_path
from iosvc.server import LocalCluster

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: What a malformed request may be answered with: a clear refusal, never a crash.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.OUT_OF_RANGE,
}
#: Operations fuzzed over gRPC (``configure`` excluded: valid arguments re-wire the cluster).
OPS = [
    "stat",
    "commit",
    "put_small",
    "read_small",
    "ls",
    "rm",
    "mkdir",
    "status",
    "policy_set",
    "policy_show",
    "stats",
    "live_uids",
    "drop",
    "pull",
    "nonsense",
    7,
    None,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
fields = st.sampled_from(
    [
        "path",
        "paths",
        "prefix",
        "recursive",
        "rec",
        "files",
        "uids",
        "chunks",
        "key",
        "ck",
        "start",
        "end",
        "size",
        "policy",
        "p",
        "s",
        "cs",
        "u",
        "id",
        "tok",
        "index",
        "peers",
        "src",
        "mt",
        "host",
    ]
)
headers = st.builds(
    lambda op, extra, ident: {"op": op, **extra, **({"id": ident} if ident is not None else {})},
    st.sampled_from(OPS),
    st.dictionaries(fields, values, max_size=6),
    st.one_of(st.none(), values, st.just(["job", "user", "group", 1])),
)


# -- local: decoder and paths ------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_unpack_of_random_bytes_is_a_frame_or_invalid_argument(frame: bytes) -> None:
    try:
        header, payload = wire.unpack(frame)
    except InvalidArgument:
        return
    assert isinstance(header, dict) and isinstance(payload, memoryview)


@FAST
@given(values, st.binary(max_size=64), st.integers(min_value=0, max_value=2**32 - 1))
def test_unpack_of_wrong_types_and_lengths(obj: Any, payload: bytes, hlen: int) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    for frame in (
        struct.pack("<I", len(body)) + body + payload,  # any msgpack object as header
        struct.pack("<I", hlen) + body + payload,  # a length prefix that lies
        struct.pack("<I", len(body)) + body[: len(body) // 2],  # truncated
    ):
        try:
            header, _ = wire.unpack(frame)
        except InvalidArgument:
            continue
        assert isinstance(header, dict)


@FAST
@given(st.one_of(st.text(max_size=300), values))
def test_path_validation_accepts_or_refuses_clearly(path: Any) -> None:
    try:
        clean = validate_path(path)
    except InvalidArgument:
        return
    assert isinstance(clean, str) and ".." not in clean.split("/") and "\x00" not in clean
    assert normalize_path(clean) == clean


# -- live server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSpec]:
    # The servers may pull from "/": pull requests are fuzzed past the root check too.
    workdir = tmp_path_factory.mktemp("fuzz")
    with LocalCluster(2, memory=64 << 20, workdir=workdir, pull_roots=["/"]) as cluster:
        assert cluster.spec is not None
        yield cluster.spec


@pytest.fixture(scope="module")
def channel(target: ClusterSpec) -> Iterator[grpc.Channel]:
    with wire.sync_channel(target.servers[0], None) as ch:
        yield ch


def _expect_clear(call: Any) -> None:
    try:
        call()
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        assert code in ALLOWED, (code, exc.details())  # type: ignore[attr-defined]


def _still_serves(spec: ClusterSpec) -> None:
    client = Client(spec)
    data = os.urandom(5000)
    client.write("fuzz-check/ok", data)
    assert client.read("fuzz-check/ok") == data


def _fuzz_server(spec: ClusterSpec, channel: grpc.Channel, examples: int) -> None:
    call = channel.unary_unary(wire.METHOD_CALL)
    read = channel.unary_stream(wire.METHOD_READ)
    write = channel.stream_unary(wire.METHOD_WRITE)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(headers, st.binary(max_size=64))
    def calls(header: dict[str, Any], payload: bytes) -> None:
        try:
            frame = wire.pack(header, payload)
        except (InvalidArgument, TypeError, ValueError, OverflowError):
            return  # not even encodable: nothing to send
        _expect_clear(lambda: call(frame, timeout=10))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=100))
    def raw_frames(frame: bytes) -> None:
        _expect_clear(lambda: call(frame, timeout=10))
        _expect_clear(lambda: list(read(frame, timeout=10)))
        _expect_clear(lambda: write(iter([frame]), timeout=10))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(values, st.lists(values, max_size=4))
    def streams(chunks: Any, frames: list[Any]) -> None:
        request = wire.pack({"id": ["j", "u", "g", 1], "chunks": chunks})
        _expect_clear(lambda: list(read(request, timeout=10)))
        packed = []
        for item in frames:
            header = item if isinstance(item, dict) else {"key": item, "ck": item}
            try:
                packed.append(wire.pack({"id": ["j", "u", "g", 1], **header}, b"x" * 10))
            except (InvalidArgument, TypeError, ValueError, OverflowError):
                continue
        _expect_clear(lambda: write(iter(packed), timeout=10))

    calls()
    raw_frames()
    streams()
    _still_serves(spec)


def test_server_answers_malformed_requests_clearly_and_keeps_serving(
    target: ClusterSpec, channel: grpc.Channel
) -> None:
    _fuzz_server(target, channel, 120)


@pytest.mark.slow
def test_server_fuzz_long(target: ClusterSpec, channel: grpc.Channel) -> None:
    _fuzz_server(target, channel, 3000)
