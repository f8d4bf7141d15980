"""TLS server contexts for listeners with a `tls` block, and the TLS layer's buffer bounds.

Owns the TLS policy (protocol floor, ALPN) and how much a TLS connection may
hold.  Which files to load is the configuration's business (`lb.config.sections`
resolves and checks them); creating them is `devcerts`'.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import os
import ssl
import tempfile
import warnings
from collections.abc import Iterator

from lb.config.model import TlsConfig
from lb.proxy.reading import READ_CHUNK
from lb.proxy.tunnel import FLUSH_STALL


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Build the server-side SSLContext for one TLS listener, from the bytes its files held when the
    configuration was read (`TlsConfig.cert_pem`, `key_pem`); the paths are not read again.

    Returns:
        A server context: TLS 1.2 or newer, ALPN offering only http/1.1.

    Raises:
        ssl.SSLError: the bytes are not PEM, the key is encrypted, or it does not match the certificate.
        OSError: no memory file could be made for them (`_in_memory`).
    """
    # Purpose.CLIENT_AUTH gives a *server* context with the stdlib's vetted
    # defaults (no compression, no renegotiation, sane cipher list).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _in_memory(tls.cert_pem, "cert") as cert, _in_memory(tls.key_pem, "key") as key:
        # An empty passphrase rather than none: with none, OpenSSL asks for one on the terminal and a
        # start with an encrypted key waits there; with this one the load fails and the config says why.
        context.load_cert_chain(certfile=cert, keyfile=key, password=b"")
    # WebSocket over HTTP/2 (RFC 8441) is not supported: the upgrade is an
    # HTTP/1.1 mechanism (RFC 6455 §4.1), so never let a client pick h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


@contextlib.contextmanager
def _in_memory(data: bytes, name: str) -> Iterator[str]:
    """A path that reads as `data`, for OpenSSL's file-only `load_cert_chain`: on Linux an anonymous
    memory file (`memfd_create`), so a private key is never written to a disk, and gone once closed;
    elsewhere (a developer's macOS, a BSD) a file only we may read, in a directory of our own, removed
    at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(f"lb-tls-{name}", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="lb-tls-") as private:  # mode 0700
        path = os.path.join(private, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tls_files_fault(tls: TlsConfig, refused: ssl.SSLError | OSError) -> list[tuple[str, str]]:
    """Which files (`cert`, `key`) are at fault, and why, once `server_ssl_context` has refused the pair.

    OpenSSL's error for a file that is not PEM names neither file (`[SSL] PEM lib (_ssl.c:3905)`,
    without a reason); the operator needs to know which one to look at.  Empty: the error `refused`
    has a reason (`[X509: KEY_VALUES_MISMATCH]`: a pair that parses but does not fit), which says
    more than a guess of ours, or each file loads alone.
    """
    # Read as an object: typeshed says str, but OpenSSL's errors without one carry None, and the
    # compiled build checks the declared type.
    reason: object = getattr(refused, "reason", None)
    if reason is not None:
        return []
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    faults: list[tuple[str, str]] = []
    for which, path, data in (("cert", tls.cert, tls.cert_pem), ("key", tls.key, tls.key_pem)):
        what = "certificate" if which == "cert" else "private key"
        try:
            # cryptography warns, rather than fails, on what OpenSSL accepts (a negative serial
            # number); a warning here is not the fault being looked for, and not the operator's to read.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if which == "cert":
                    x509.load_pem_x509_certificates(data)
                else:
                    serialization.load_pem_private_key(data, password=None)
        except TypeError:  # the key wants a password
            faults.append((which, f"{path} is encrypted: the key must be unencrypted PEM (no passphrase)"))
        except (ValueError, UnsupportedAlgorithm):
            faults.append((which, f"{path} holds no PEM {what} that loads"))
    return faults


# The TLS layer of both event loops buffers on its own, above the socket transport under it: up to
# 512 KiB of records for a client that does not read (its write high-water mark) and 256 KiB of a
# client's records while we do not read (its read high-water mark).  Those were about 740 KiB per
# stalled TLS tunnel, where a plain one holds 64 + 32 KiB (`lb.proxy.reading`).  These match the
# plain transports: 64 KiB for writes, as their default, and one read's worth of records.
TLS_WRITE_HIGH = 64 * 1024
TLS_READ_HIGH = READ_CHUNK


# Seconds a TLS connection that we close has, in all, to take what is left of our bytes and answer
# our close_notify: the TLS layer of both loops has one timer for the two, whose default, 30 s, kept
# a closed connection's descriptor and its place in limits.max_connections for that long after its
# end (a client that never answers close_notify: most just close TCP).  As long as a plain connection's
# close may go without progress, but counted in all, not from the last progress: a TLS reader slower
# than about 13 KB/s (128 KiB left in the two layers) is cut where a plain one would not be.
TLS_SHUTDOWN_TIMEOUT = FLUSH_STALL


# asyncio's TLS layer (the loop when uvloop is absent or `runtime.event_loop: asyncio`) also gives
# every connection a zeroed read buffer of `SSLProtocol.max_size`, 256 KiB, from its first byte to
# its last: 256 KiB per idle TLS client.  A TLS record carries at most 16 KiB (RFC 8446 §5.1), so
# reads of 32 KiB lose nothing but a few more reads of a bulk upload.  uvloop's layer allocates its
# buffer without touching it, and takes no setting.
ASYNCIO_TLS_READ = READ_CHUNK


def bound_asyncio_reads() -> None:
    """Size asyncio's per-connection TLS read buffer (see ASYNCIO_TLS_READ); call before serving."""
    asyncio.sslproto.SSLProtocol.max_size = ASYNCIO_TLS_READ


def bound_buffers(transport: asyncio.Transport) -> None:
    """Hold a TLS connection's own buffers to a plain connection's bounds (see TLS_WRITE_HIGH)."""
    transport.set_write_buffer_limits(high=TLS_WRITE_HIGH)
    transport.set_read_buffer_limits(high=TLS_READ_HIGH)  # type: ignore[attr-defined]
