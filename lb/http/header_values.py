"""Header values as text: what a field's bytes spell, for the values that are words, not tokens.  [pure]

`lb.http.head` reads a head as latin-1, one character a byte, so that offsets, checks and what is
sent on keep every byte as it came.  A value that is someone's text (a user id a pool hashes, a
backend's `X-Backend-State` in a log line) is read again here as the UTF-8 its bytes spell.  What
is done with that text (hashing a key, quoting it in a log) is left to the callers.
"""

from __future__ import annotations


def header_text(value: str) -> str:
    """A header's value (read as latin-1: one character a byte) as the text its bytes spell in UTF-8.

    `/route` reads its key as UTF-8 (a URL's percent-escapes are), so `X-User-Id: Jürgen` sent in
    UTF-8 must hash as `Jürgen`, not as its latin-1 reading `JÃ¼rgen`.  Bytes that are not UTF-8
    stay themselves as surrogate escapes, which `lb.affinity.balancing.hash_choose` encodes back to
    those bytes.
    """
    return value if value.isascii() else value.encode("latin-1").decode("utf-8", "surrogateescape")
