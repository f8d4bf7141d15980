"""What a valid configuration will do that its operator may not expect.  [pure]

Not problems (`lb.config.load` refuses those): each is a setting that works as written
but quietly defeats its purpose.  `lb validate` prints them, and the balancer logs them
as warnings at start and on every reload, so they are seen before a player is.
"""

from __future__ import annotations

from lb.config.model import Config, SameSite, SecureMode


def advice(config: Config, *, crc32c_in_c: bool = True) -> list[str]:
    """One sentence per surprise, each naming the key to change.

    Args:
        crc32c_in_c: whether google-crc32c runs its C code (`lb.http.proxy_header.CRC32C_IN_C`).
    """
    said: list[str] = []
    proxied = [f"listeners[{i}]" for i, listener in enumerate(config.listeners) if listener.proxy_protocol]
    if proxied and not crc32c_in_c:
        said.append(
            f"{', '.join(proxied)}.proxy_protocol: google-crc32c runs its pure-Python fallback here, so a PROXY "
            "v2 header's CRC32c costs ~200 µs instead of 0.2 µs; install a google-crc32c wheel for this platform"
        )
    if config.admin.token is None:
        said.append(
            "admin.token is not set: the admin API serves GET only, and drain, disable and enable "
            "(the dashboard's buttons, lb ctl) answer 401"
        )
    affinity = config.affinity
    if affinity.same_site is SameSite.NONE and affinity.secure is SecureMode.AUTO:
        # Browsers drop a `SameSite=None` cookie without `Secure` (and so never send it back);
        # `secure: never` with it is a problem lb.config.load refuses.
        plain = [f"listeners[{i}]" for i, listener in enumerate(config.listeners) if listener.tls is None]
        if plain:
            said.append(
                f"affinity.same_site is None: on {', '.join(plain)} (no TLS) the cookie goes without "
                "Secure, and browsers drop it there, so their browser clients never stick"
            )
    return said
