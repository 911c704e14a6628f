"""TLS, mutual TLS and bearer-token auth accept the right credentials and refuse the wrong ones;
the client retries UNAVAILABLE. Certificates are made in the test with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_server import SENTENCES, server_config, write_checkpoint
from translator.client import ClientTls, TranslatorClient
from translator.server import TlsConfig, create_server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("security") / "tiny.pt", toy_tokenizer)


@pytest.fixture(scope="module")
def start(checkpoint):
    """start(**ServerConfig changes) -> (server, target): a started server on the tiny checkpoint."""

    def start_server(**changes):
        srv, port = create_server(server_config(checkpoint, **changes))
        srv.start()
        return srv, f"127.0.0.1:{port}"

    return start_server


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(name: str, issuer: tuple | None = None, ca: bool = False) -> tuple:
    """A (certificate, key) for `name`, self-signed when issuer is None; EC keys are quick to make."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: a CA, a server and a client certificate it signed, and a client from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca = issue("test CA", ca=True)
    rogue_ca = issue("rogue CA", ca=True)
    parts = {"ca": ca, "server": issue("localhost", ca), "client": issue("client", ca),
             "rogue": issue("rogue client", rogue_ca)}
    files = {}
    for name, (cert, key) in parts.items():
        (folder / f"{name}.crt").write_bytes(pem(cert))
        (folder / f"{name}.key").write_bytes(pem(key))
        files[name] = str(folder / f"{name}.crt")
        files[f"{name}_key"] = str(folder / f"{name}.key")
    return files


def translates(target: str, **client_args) -> grpc.StatusCode:
    with TranslatorClient(target, timeout=30, retries=0, **client_args) as client:
        try:
            client.translate(SENTENCES[:1])
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(start, pki):
    srv, target = start(tls=TlsConfig(cert_file=pki["server"], key_file=pki["server_key"]))
    try:
        assert translates(target, tls=ClientTls(ca_file=pki["ca"])) == grpc.StatusCode.OK
        assert translates(target) == grpc.StatusCode.UNAVAILABLE  # plaintext never reaches a handler
        assert translates(target, tls=ClientTls(ca_file=pki["rogue"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(start, pki):
    srv, target = start(tls=TlsConfig(cert_file=pki["server"], key_file=pki["server_key"],
                                      client_ca_file=pki["ca"]))
    try:
        good = ClientTls(ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"])
        assert translates(target, tls=good) == grpc.StatusCode.OK
        assert translates(target, tls=ClientTls(ca_file=pki["ca"])) == grpc.StatusCode.UNAVAILABLE
        rogue = ClientTls(ca_file=pki["ca"], cert_file=pki["rogue"], key_file=pki["rogue_key"])
        assert translates(target, tls=rogue) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_bearer_token_is_required_except_for_health_checks(start, tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n", encoding="utf-8")
    srv, target = start(auth_token_file=str(tmp_path / "token"))
    try:
        assert translates(target, token="s3cret-token") == grpc.StatusCode.OK
        assert translates(target, token="s3cret-tokem") == grpc.StatusCode.UNAUTHENTICATED
        assert translates(target) == grpc.StatusCode.UNAUTHENTICATED
        with TranslatorClient(target, timeout=30, retries=0) as client:
            with pytest.raises(grpc.RpcError) as e:
                list(client.translate_stream(SENTENCES[:1]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_client_retries_unavailable_until_the_server_is_up(start):
    with socket.socket() as s:  # a port that is free now; the server takes it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers = []
    late = threading.Timer(0.5, lambda: servers.append(start(port=port)))
    late.start()
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=30, retries=8, backoff=0.2) as client:
            start_time = time.monotonic()
            assert len(client.translate(SENTENCES[:1]).translations) == 1
            assert time.monotonic() - start_time >= 0.4
    finally:
        late.join()
        for srv, _ in servers:
            srv.stop()


def test_client_gives_up_after_its_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = TranslatorClient(f"127.0.0.1:{port}", timeout=5, retries=2, backoff=0.01)
    with client, pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
