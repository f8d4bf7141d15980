"""TLS server contexts for listeners with a `tls` block.

Owns the TLS policy (protocol floor, ALPN).  Which files to load is the
configuration's business (`lb.config.load` resolves and checks them); creating
them is `devcerts`'.
"""

from __future__ import annotations

import ssl

from lb.config.model import TlsConfig


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Build the server-side SSLContext for one TLS listener.

    Args:
        tls: absolute paths of the PEM certificate chain and its private key.

    Returns:
        A server context: TLS 1.2 or newer, ALPN offering only http/1.1.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the files are not PEM, or the key does not match the certificate.
    """
    # Purpose.CLIENT_AUTH gives a *server* context with the stdlib's vetted
    # defaults (no compression, no renegotiation, sane cipher list).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    # WebSocket over HTTP/2 (RFC 8441) is not supported: the upgrade is an
    # HTTP/1.1 mechanism (RFC 6455 §4.1), so never let a client pick h2.
    context.set_alpn_protocols(["http/1.1"])
    return context
