"""Development certificates for `lb certs`: a throwaway CA and a server certificate it signs.

Owns the certificate profile (EC P-256, extensions, 825-day validity) and the
file layout (`ca.crt`, `ca.key`, `server.crt`, `server.key`).  Loading them into
an SSLContext is `lb.tls`'s job.  Never for production: the CA key sits next to
the certificates.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# 825 days is the longest lifetime Apple platforms accept for a TLS server certificate.
VALIDITY = datetime.timedelta(days=825)
# Backdated so that a client whose clock runs a little behind still accepts it.
BACKDATE = datetime.timedelta(days=1)
# A CA from an earlier run with less than this left is replaced, not kept: what it signs would expire with it.
CA_MIN_LEFT = datetime.timedelta(days=30)


class CaFate(enum.Enum):
    """What `write_dev_certs` did with the CA."""

    MADE = "made"  # there was none
    KEPT = "kept"  # an earlier run's CA signed the new server certificate: whoever trusts it still does
    REPLACED = "replaced"  # an earlier run's CA had under CA_MIN_LEFT to live: clients must trust the new one


@dataclass(frozen=True, slots=True)
class DevCerts:
    """Where `write_dev_certs` put each file, and what became of the CA."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca: CaFate = CaFate.MADE


class UnusableCa(ValueError):
    """`ca.crt` and `ca.key` are there but are not a CA and its key: not replaced (someone may trust it)."""


def write_dev_certs(
    out_dir: Path, hosts: Sequence[str], *, now: datetime.datetime | None = None
) -> DevCerts:
    """Create a server certificate for `hosts`, signed by the CA already in `out_dir` or by a new one.

    A CA written by an earlier run is kept (as mkcert keeps its root): clients and browsers told to
    trust it go on trusting the new server certificate.  Replacing it on every run broke each of
    them.  It is replaced only when it has less than CA_MIN_LEFT to live.

    Args:
        out_dir: created if missing.
        hosts: DNS names and IP literals for the server certificate's subjectAltName.
        now: start of validity (minus one day); the current time when None.

    Returns:
        The paths of the four files; both keys are written with mode 0600.

    Raises:
        ValueError: `hosts` is empty or holds an empty or non-ASCII name.
        UnusableCa: `ca.crt` and `ca.key` are there, but do not load as a CA and its key.
        OSError: the directory or a file cannot be written.
    """
    names = [_general_name(host) for host in hosts]
    if not names:
        raise ValueError("at least one host is required")
    moment = now or datetime.datetime.now(datetime.UTC)
    start = moment - BACKDATE
    paths = DevCerts(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
    )
    kept = _earlier_ca(paths, moment)
    if kept is None:  # none, or one that was about to expire
        fate = CaFate.REPLACED if paths.ca_cert.exists() else CaFate.MADE
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, start)
    else:
        fate = CaFate.KEPT
        ca_key, ca_cert = kept
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, names, hosts[0], ca_cert, ca_key, start)

    out_dir.mkdir(parents=True, exist_ok=True)
    if kept is None:
        _write(paths.ca_key, _key_pem(ca_key), private=True)
        _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return dataclasses.replace(paths, ca=fate)


def _earlier_ca(
    paths: DevCerts, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The CA an earlier run left in the directory, if there is one with CA_MIN_LEFT to live.

    Raises:
        UnusableCa: both files are there, but are not a CA certificate and its EC key.
    """
    found = [path for path in (paths.ca_cert, paths.ca_key) if path.exists()]
    if not found:
        return None
    unusable = UnusableCa(
        f"{paths.ca_cert} and {paths.ca_key} are there but are not a CA and its key that lb certs wrote; "
        "move them away for a new CA"
        if len(found) == 2 else
        f"{found[0]} is there without its {'key' if found[0] == paths.ca_cert else 'certificate'}; "
        "move it away for a new CA"
    )
    if len(found) == 1:
        raise unusable
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound) as exc:
        raise unusable from exc
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and constraints.ca and key.public_key() == cert.public_key()):
        raise unusable
    if cert.not_valid_after_utc - now < CA_MIN_LEFT:
        return None
    return key, cert


# RFC 1123 labels (letters, digits, inner hyphens, up to 63 each, 253 in all); a leading `*.`
# for a wildcard certificate (RFC 6125 §6.4.3).  Stricter than the config's host names
# (lb.config.scalars.HOSTNAME_RE admits `_`, as SRV names have it): a subjectAltName dNSName must
# be in the preferred name syntax (RFC 5280 §4.2.1.6), and clients refuse others.
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?"
)


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise ValueError("empty host name")
    try:
        # RFC 6125 §6.2.1 / RFC 2818: IP literals match only iPAddress SAN entries.
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not host.isascii():
        raise ValueError(f"host names must be ASCII (use the xn-- form), got {host!r}")
    if not _DNS_NAME.fullmatch(host):
        # A name no client can ask for would only make a certificate that never verifies.
        raise ValueError(f"not a DNS name or IP address: {host!r}")
    if host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        # `10.0.0.256`, `1.2.3.4.5`: a top-level label is never all digits (RFC 3696 §2), and URL
        # parsers read such a host as an IPv4 address (`127.1` is 127.0.0.1 to a browser), so it is a
        # mistyped IP, and a dNSName of it would match no client.
        raise ValueError(f"not a DNS name or IP address: {host!r} (it ends in digits, as an IPv4 address does)")
    return x509.DNSName(host)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, start: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lb development CA")])
    public_key = key.public_key()
    # Key identifiers and critical constraints: OpenSSL's X509_V_FLAG_X509_STRICT
    # (on by default in Python 3.13's create_default_context) insists on them.
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    names: Sequence[x509.GeneralName],
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name.strip()[:64])])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        # Not past its CA (a kept one may have less than VALIDITY left): clients refuse the chain then.
        .not_valid_after(min(start + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Clients match the host against subjectAltName only, never the CN (RFC 6125 §6.4.4).
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # An EC key signs (ECDHE handshakes, or certificates for the CA); it never encrypts.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    # Create with the final mode so a key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(file.fileno(), mode)
        file.write(data)
