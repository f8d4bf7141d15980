"""lb.http.header_values: a header's value, parsed as latin-1, read again as the UTF-8 its bytes spell."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.http.header_values import header_text


def on_the_wire(raw: bytes) -> str:
    """`raw` as lb.http.head holds a field value read from the wire: one character a byte."""
    return raw.decode("latin-1")


@pytest.mark.parametrize(("raw", "text"), [
    pytest.param(b"u-42 x", "u-42 x", id="ascii"),
    pytest.param("Jürgen".encode(), "Jürgen", id="utf-8"),
    pytest.param("voilà".encode(), "voilà", id="utf-8-ending-in-0xa0"),  # NBSP to str.strip(), kept
    pytest.param("用户".encode(), "用户", id="utf-8-past-latin-1"),
    pytest.param(b"Drain\xe9", "Drain\udce9", id="not-utf-8"),
    pytest.param(b"", "", id="empty"),
])
def test_a_value_reads_as_the_text_its_bytes_spell(raw: bytes, text: str) -> None:
    """UTF-8 bytes read as their text (`Jürgen`, not `JÃ¼rgen`); bytes that are not UTF-8 as surrogate escapes."""
    assert header_text(on_the_wire(raw)) == text


@given(st.binary(max_size=64))
def test_the_text_encodes_back_to_the_bytes_sent(raw: bytes) -> None:
    """No two values read alike: a hash of the text (`hash_choose` encodes it with surrogateescape) is a hash
    of the bytes the client sent."""
    assert header_text(on_the_wire(raw)).encode("utf-8", "surrogateescape") == raw
