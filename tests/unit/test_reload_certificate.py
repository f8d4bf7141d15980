"""A kept TLS listener's certificate on reload: files that turn unloadable between the check and the swap, and a
change of key type (the new certificate alone is served, whatever the client prefers)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from lb.config import sections
from lb.config.load import load_config
from lb.control.balancer import Balancer
from lb.devcerts import write_dev_certs
from tests.harness.in_process import in_process_config


@contextlib.asynccontextmanager
async def running(config_path: Path) -> AsyncIterator[Balancer]:
    """The balancer on `config_path`, started, in this process; stopped at the end."""
    balancer = Balancer(load_config(config_path), config_path)
    await balancer.start()
    try:
        yield balancer
    finally:
        await balancer.stop()


def write_tls_config(config_path: Path, cert: Path, key: Path) -> None:
    """A balancer config with one TLS listener on a port the kernel picks."""
    config_path.write_text(in_process_config(f"""
  - bind: 127.0.0.1:0
    tls: {{cert: {cert}, key: {key}}}
"""))


def test_a_certificate_unloadable_at_the_swap_keeps_the_old_one_and_completes_the_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    certs = write_dev_certs(tmp_path / "certs", ["127.0.0.1"])
    config_path = tmp_path / "lb.yaml"
    write_tls_config(config_path, certs.server_cert, certs.server_key)

    async def scenario() -> None:
        async with running(config_path) as balancer:
            # load_config's check saw good files; by the swap the certificate is a new one and the key still
            # the old one (a renewal halfway through writing the pair).
            monkeypatch.setattr(sections, "server_ssl_context", lambda tls: None)
            before = der(certs.server_cert)
            other = await asyncio.to_thread(write_dev_certs, tmp_path / "other", ["127.0.0.1"])
            await asyncio.to_thread(certs.server_cert.write_bytes, other.server_cert.read_bytes())
            with caplog.at_level(logging.ERROR, logger="lb.control.listening"):
                assert await balancer.reload()
            assert "keeps its previous certificate" in caplog.text
            assert all(listening.server.is_serving() for listening in balancer._listening)
            # And it still serves the previous one with its key (loaded into the old context, the new
            # certificate took the slot and dropped the old key: every handshake failed).
            assert await asyncio.to_thread(served, tls_port(balancer)) == before

    asyncio.run(scenario())


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def write_rsa_pair(cert_path: Path, key_path: Path, name: str) -> None:
    """A self-signed RSA certificate (the client here checks which one it got, not whether to trust it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def tls_port(balancer: Balancer) -> int:
    [listening] = balancer._listening
    return listening.address[1]


def served(port: int, *, rsa_only: bool = False) -> bytes | None:
    """The certificate a client gets from 127.0.0.1:`port` (DER), or None if the handshake fails.
    `rsa_only`: a TLS 1.2 client that offers only ECDHE-RSA suites."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if rsa_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)
        except (ssl.SSLError, OSError):
            return None


@pytest.mark.parametrize("first", ["ecdsa", "rsa"])
def test_a_reload_to_another_key_type_serves_the_new_certificate_alone(tmp_path: Path, first: str) -> None:
    """OpenSSL holds a certificate per key type: the new pair loaded into the listener's context left the old one
    served, with its key, to clients that prefer (or only take) its type: after a reload from ECDSA (`lb certs`) to
    RSA (most public CAs), every default client still got the old certificate."""
    ecdsa = write_dev_certs(tmp_path / "ecdsa", ["127.0.0.1"])
    rsa_cert, rsa_key = tmp_path / "rsa.crt", tmp_path / "rsa.key"
    write_rsa_pair(rsa_cert, rsa_key, "rsa")
    pairs = {"ecdsa": (ecdsa.server_cert, ecdsa.server_key), "rsa": (rsa_cert, rsa_key)}
    second = "rsa" if first == "ecdsa" else "ecdsa"
    config_path = tmp_path / "lb.yaml"

    write_tls_config(config_path, *pairs[first])

    async def scenario() -> None:
        async with running(config_path) as balancer:
            port = tls_port(balancer)
            assert await asyncio.to_thread(served, port) == der(pairs[first][0])
            write_tls_config(config_path, *pairs[second])
            assert await balancer.reload()
            assert await asyncio.to_thread(served, port) == der(pairs[second][0])
            # A client that takes RSA alone gets the new RSA certificate, or none once it is ECDSA.
            expected = der(rsa_cert) if second == "rsa" else None
            assert await asyncio.to_thread(served, port, rsa_only=True) == expected

    asyncio.run(scenario())


def test_a_reload_that_leaves_the_files_as_they_were_keeps_the_context_and_its_sessions(tmp_path: Path) -> None:
    """A new context at every reload threw away the session cache and ticket keys: every client that reconnected
    after a reload (of anything) made a full handshake."""
    certs = write_dev_certs(tmp_path / "certs", ["127.0.0.1"])
    config_path = tmp_path / "lb.yaml"
    write_tls_config(config_path, certs.server_cert, certs.server_key)

    async def scenario() -> None:
        async with running(config_path) as balancer:
            [listening] = balancer._listening
            before = listening.ssl_context
            assert await balancer.reload()
            assert listening.ssl_context is before
            await asyncio.to_thread(write_dev_certs, tmp_path / "certs", ["127.0.0.1"])  # renewed: new files
            assert await balancer.reload()
            assert listening.ssl_context is not before
            assert await asyncio.to_thread(served, tls_port(balancer)) == der(certs.server_cert)

    asyncio.run(scenario())
