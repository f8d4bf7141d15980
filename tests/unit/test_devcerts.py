"""Dev certificates (`lb certs`) and the TLS server context built from them."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lb.config.model import TlsConfig
from lb.devcerts import CaFate, DevCerts, UnusableCa, write_dev_certs
from lb.tls import server_ssl_context

TIMEOUT = 5.0  # seconds; bounds every blocking socket call in the loopback test


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return write_dev_certs(tmp_path_factory.mktemp("certs"), ["localhost", "127.0.0.1"])


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_four_files_with_private_keys_owner_only(certs: DevCerts) -> None:
    """ca.crt, ca.key, server.crt, server.key are written; both keys have mode 0600."""
    assert [p.name for p in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key)] == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    assert certs.ca_cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_ca_is_a_signing_ca(certs: DevCerts) -> None:
    """The CA carries critical BasicConstraints(ca=True) and KeyUsage(keyCertSign)."""
    ca = load(certs.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and constraints.value.ca
    assert usage.critical and usage.value.key_cert_sign


def test_server_cert_names_hosts_and_is_signed_by_the_ca(certs: DevCerts) -> None:
    """The server cert has DNS and IP SANs, serverAuth, and verifies against the CA key."""
    ca, server = load(certs.ca_cert), load(certs.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)


def test_validity_is_backdated_one_day_and_lasts_825_days(tmp_path: Path) -> None:
    """Both certificates are valid from now minus one day, for 825 days."""
    now = datetime.datetime(2030, 1, 15, 12, 0, tzinfo=datetime.UTC)
    written = write_dev_certs(tmp_path, ["localhost"], now=now)
    for path in (written.ca_cert, written.server_cert):
        cert = load(path)
        assert cert.not_valid_before_utc == now - datetime.timedelta(days=1)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=825)


def test_rewriting_keeps_keys_private(tmp_path: Path) -> None:
    """Writing over a world-readable key file still leaves it 0600."""
    (tmp_path / "server.key").write_text("old")
    (tmp_path / "server.key").chmod(0o644)
    written = write_dev_certs(tmp_path, ["localhost"])
    assert stat.S_IMODE(written.server_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "host", ["localhost", "gw-0.gateway.game.svc.cluster.local", "*.example.com", "fqdn.example.", "127.0.0.1", "[::1]"]
)
def test_accepts_dns_names_wildcards_and_ip_literals(tmp_path: Path, host: str) -> None:
    assert write_dev_certs(tmp_path / "out", [host]).server_cert.exists()


@pytest.mark.parametrize(
    "hosts",
    [[], [""], ["bücher.example"], ["bad host!"], ["a..b"], ["-lead.example"], ["x" * 64 + ".example"],
     ["localhost", "under_score.example"], ["10.0.0.256"], ["1.2.3.4.5"], ["127.1"], ["localhost", "example.123."]],
)
def test_rejects_unusable_hosts(tmp_path: Path, hosts: list[str]) -> None:
    """No hosts, an empty host, a non-ASCII name or anything not a DNS name (no client could ask for it)
    is a ValueError, and nothing is written.  A mistyped IPv4 address (`10.0.0.256`) was written as a DNS
    name no client matches: a name ending in an all-digit label is one of these."""
    with pytest.raises(ValueError):
        write_dev_certs(tmp_path / "out", hosts)
    assert not (tmp_path / "out").exists()


def _tls_of(certs: DevCerts) -> TlsConfig:
    return TlsConfig(str(certs.server_cert), str(certs.server_key), certs.server_cert.read_bytes(),
                     certs.server_key.read_bytes())


def test_server_context_policy(certs: DevCerts) -> None:
    """The listener context is a TLS server context with TLS 1.2 as the floor."""
    context = server_ssl_context(_tls_of(certs))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


def _serve(listener: socket.socket, context: ssl.SSLContext, count: int, errors: list[BaseException]) -> None:
    for _ in range(count):
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall((tls.selected_alpn_protocol() or "none").encode())
        except (OSError, ssl.SSLError) as exc:  # the client side reports the failure that matters
            errors.append(exc)


def test_python_ssl_verifies_the_chain_on_loopback(certs: DevCerts) -> None:
    """A default-verification client trusting ca.crt connects to 127.0.0.1 and localhost; ALPN is http/1.1."""
    server_context = server_ssl_context(_tls_of(certs))
    client_context = ssl.create_default_context(cafile=str(certs.ca_cert))
    client_context.set_alpn_protocols(["h2", "http/1.1"])
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        server = threading.Thread(target=_serve, args=(listener, server_context, 3, errors), daemon=True)
        server.start()
        for name in ("127.0.0.1", "localhost"):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                client_context.wrap_socket(raw, server_hostname=name) as tls,
            ):
                assert tls.recv(16) == b"http/1.1"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # A name that is not in the certificate must fail verification.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_context.wrap_socket(raw, server_hostname="example.com")
        server.join(TIMEOUT)
    assert not server.is_alive()
    assert len(errors) == 1  # only the refused example.com handshake


def test_a_second_run_keeps_the_ca_so_whoever_trusts_it_trusts_the_new_certificate(tmp_path: Path) -> None:
    """As mkcert keeps its root: a new CA at every run broke every client told to trust the first."""
    first = write_dev_certs(tmp_path, ["localhost"])
    ca_pem, ca_key_pem = first.ca_cert.read_bytes(), first.ca_key.read_bytes()
    old_server = first.server_cert.read_bytes()
    second = write_dev_certs(tmp_path, ["gw.example", "127.0.0.1"])
    assert (first.ca, second.ca) == (CaFate.MADE, CaFate.KEPT)
    assert (second.ca_cert.read_bytes(), second.ca_key.read_bytes()) == (ca_pem, ca_key_pem)
    assert second.server_cert.read_bytes() != old_server
    server = load(second.server_cert)
    server.verify_directly_issued_by(load(second.ca_cert))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gw.example"]


def test_a_ca_about_to_expire_is_replaced_and_never_outlived(tmp_path: Path) -> None:
    """A kept CA signs a certificate that ends with it at the latest; one with under 30 days left is replaced."""
    now = datetime.datetime(2030, 1, 15, 12, 0, tzinfo=datetime.UTC)
    write_dev_certs(tmp_path, ["localhost"], now=now)
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    later = now + datetime.timedelta(days=700)
    kept = write_dev_certs(tmp_path, ["localhost"], now=later)
    assert kept.ca is CaFate.KEPT and kept.ca_cert.read_bytes() == ca_pem
    assert load(kept.server_cert).not_valid_after_utc == load(kept.ca_cert).not_valid_after_utc
    replaced = write_dev_certs(tmp_path, ["localhost"], now=now + datetime.timedelta(days=800))
    assert replaced.ca is CaFate.REPLACED and replaced.ca_cert.read_bytes() != ca_pem


@pytest.mark.parametrize("which", ["ca.crt", "ca.key", "both", "another CA's key"])
def test_ca_files_that_are_not_a_ca_are_refused_and_left_alone(tmp_path: Path, which: str) -> None:
    written = write_dev_certs(tmp_path, ["localhost"])
    other = write_dev_certs(tmp_path / "other", ["localhost"])
    if which in ("ca.crt", "both"):
        written.ca_cert.write_bytes(other.server_cert.read_bytes())  # a certificate, not a CA
    if which in ("ca.key", "both"):
        written.ca_key.write_text("not a key")
    if which == "another CA's key":
        written.ca_key.write_bytes(other.ca_key.read_bytes())
    before = {path: path.read_bytes() for path in (written.ca_cert, written.ca_key)}
    with pytest.raises(UnusableCa, match="move them away"):
        write_dev_certs(tmp_path, ["localhost"])
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.parametrize("alone", ["ca.crt", "ca.key"])
def test_half_a_ca_is_refused_and_left_alone(tmp_path: Path, alone: str) -> None:
    """A CA certificate without its key (or the key alone) may be one someone trusts: not replaced, unsaid."""
    written = write_dev_certs(tmp_path, ["localhost"])
    (written.ca_key if alone == "ca.crt" else written.ca_cert).unlink()
    before = (tmp_path / alone).read_bytes()
    with pytest.raises(UnusableCa, match="move it away"):
        write_dev_certs(tmp_path, ["localhost"])
    assert (tmp_path / alone).read_bytes() == before



def test_a_context_is_built_without_memory_files_too(
    certs: DevCerts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """macOS and the BSDs have no memfd_create: the pair goes through a private file, removed at once (on
    them `make run`, whose example config has a TLS listener, died with an AttributeError)."""
    import os
    import tempfile

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    context = server_ssl_context(_tls_of(certs))
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert list(tmp_path.iterdir()) == []  # nothing of the key left behind
