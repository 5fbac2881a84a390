"""TLS on the gRPC port, with certificates the test suite generates (``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iosvc.client import Client
from iosvc.config import ClusterSpec
from iosvc.errors import InvalidArgument, Unavailable
from iosvc.server import LocalCluster


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("certs")
    cert, key = make_cert(directory, "cluster")
    other, _ = make_cert(directory, "stranger")
    return {"cert": cert, "key": key, "other": other}


@pytest.fixture(scope="module")
def tls_cluster(
    certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterSpec]:
    with LocalCluster(
        2,
        memory=64 << 20,
        workdir=tmp_path_factory.mktemp("tls"),
        tls_cert=certs["cert"],
        tls_key=certs["key"],
    ) as cluster:
        assert cluster.spec is not None
        yield cluster.spec


def test_client_reads_and_writes_over_tls(tls_cluster: ClusterSpec, certs: dict[str, Path]) -> None:
    assert tls_cluster.extra["tls_ca"] == str(certs["cert"].resolve())
    client = Client(tls_cluster)  # the cluster file names the CA
    data = os.urandom(3 << 20)  # striped over both servers, so server-to-server TLS too
    client.write("tls/blob", data)
    assert client.read("tls/blob") == data
    client.rm("tls/blob")  # the home server tells its peer to drop chunks, over TLS
    # No plaintext data port beside TLS: bulk transfers stay on the encrypted gRPC streams.
    assert all(s["data_port"] is None and s["data_bytes_sent"] == 0 for s in client.status())


def test_plaintext_client_against_tls_server_gets_a_clear_error(tls_cluster: ClusterSpec) -> None:
    plain = ClusterSpec.from_dict({**tls_cluster.to_dict(), "tls_ca": None})
    from iosvc.client import AsyncClient

    client = Client(plain)
    client.aio = AsyncClient(plain, retries=2)  # type: ignore[misc]
    with pytest.raises(Unavailable, match="TLS"):
        client.read("tls/anything")


def test_wrong_ca_is_refused_clearly(tls_cluster: ClusterSpec, certs: dict[str, Path]) -> None:
    from iosvc.client import AsyncClient

    client = Client(tls_cluster)
    client.aio = AsyncClient(tls_cluster, tls_ca=str(certs["other"]), retries=2)  # type: ignore[misc]
    with pytest.raises(Unavailable, match="TLS failed"):
        client.read("tls/anything")


def test_bad_tls_files_are_refused(tmp_path: Path, certs: dict[str, Path]) -> None:
    from iosvc import wire

    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgument, match="not a PEM file"):
        wire.channel_credentials(str(tmp_path / "junk.pem"))
    with pytest.raises(InvalidArgument, match="cannot read TLS CA"):
        wire.channel_credentials(str(tmp_path / "absent.pem"))
    with pytest.raises(ValueError, match="both"):
        LocalCluster(1, tls_cert=certs["cert"])


def test_cli_up_with_tls(tmp_path: Path, certs: dict[str, Path], iosvc_cli: Any) -> None:
    def iosvc(*args: str) -> subprocess.CompletedProcess[str]:
        return iosvc_cli(*args, env={"IOSVC_CLUSTER": str(tmp_path / "cluster.json")})

    up = iosvc(
        "up",
        "--servers",
        "1",
        "--memory",
        "64MiB",
        "--no-metrics",
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    )
    assert up.returncode == 0, up.stderr
    try:
        src = tmp_path / "hello.txt"
        src.write_text("over TLS\n")
        assert iosvc("put", str(src), "t/hello.txt").returncode == 0
        assert iosvc("cat", "t/hello.txt").stdout == "over TLS\n"
        bad = iosvc("serve", "--tls-cert", str(certs["cert"]))
        assert bad.returncode == 1 and "both --tls-cert and --tls-key" in bad.stderr
    finally:
        iosvc("down")
