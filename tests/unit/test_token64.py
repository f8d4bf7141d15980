"""An affinity token's text (lb/affinity/_token64.c and the Python in lb.affinity.codec that stands in for it).

Both ways must say what the reference says: base64url without padding (RFC 4648 §5), and
of text only the one spelling `encode` makes, so a client cannot make variants of one token.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import pure_python_requested
from lb.affinity import codec

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SHAPE = re.compile(r"[A-Za-z0-9_-]+")


def reference_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def reference_decode(token: str) -> bytes | None:
    """The bytes `token` spells when it is exactly what `reference_encode` makes of them, else None."""
    if not _SHAPE.fullmatch(token) or len(token) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw if reference_encode(raw) == token else None


def _pairs() -> list[tuple[Callable[[bytes], str], Callable[[str], bytes | None]]]:
    pairs: list[tuple[Callable[[bytes], str], Callable[[str], bytes | None]]] = [
        (codec._encode_in_python, codec._decode_in_python)
    ]
    try:
        from lb.affinity import _token64
    except ImportError:  # not built (no C compiler): the Python pair alone, and the wiring test skips
        return pairs
    return [*pairs, (_token64.encode, _token64.decode)]


@given(st.binary(max_size=80))
@settings(max_examples=1000)
def test_bytes_encode_as_the_reference_and_decode_back(raw: bytes) -> None:
    for encode, decode in _pairs():
        text = encode(raw)
        assert text == reference_encode(raw), encode
        assert type(text) is str and text.isascii()
        assert decode(text) == raw if raw else decode(text) is None  # empty text is no token


@st.composite
def _spellings(draw: st.DrawFn) -> str:
    """An encoding (a third of them), or with its last character (its spare bits) or another one changed,
    one appended or the last dropped: the one spelling and its near variants."""
    text = reference_encode(draw(st.binary(min_size=1, max_size=18)))
    edit = draw(st.sampled_from(["none", "none", "last", "any", "append", "drop"]))
    character = st.sampled_from(ALPHABET + "=+/.~ \x00\x80é")
    if edit == "last":
        return text[:-1] + draw(st.sampled_from(ALPHABET))
    if edit == "any":
        at = draw(st.integers(0, len(text) - 1))
        return text[:at] + draw(character) + text[at + 1 :]
    if edit == "append":
        return text + draw(character)
    return text[:-1] if edit == "drop" else text


@given(_spellings() | st.text(alphabet=ALPHABET + "=+/.~ \x00\x80é", max_size=24) | st.text(max_size=12))
@settings(max_examples=1500)
def test_text_decodes_only_when_it_is_the_one_spelling(token: str) -> None:
    expected = reference_decode(token)
    for _, decode in _pairs():
        assert decode(token) == expected, (decode, token)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_last_character_after_a_whole_prefix(length: int) -> None:
    """Each spare bit, each edge of the alphabet and every byte in the last place, at each length."""
    prefix = "QUJD"[: length - 1] if length <= 4 else "QUJD" + "QUJD"[: length - 5]
    for code in range(256):
        token = prefix + chr(code)
        expected = reference_decode(token)
        for _, decode in _pairs():
            assert decode(token) == expected, (decode, token)


@pytest.mark.parametrize("code", [*range(256), 0x100, 0x1F600])
def test_every_character_in_every_place_of_a_group(code: int) -> None:
    for place in range(4):
        token = "QUJD" * 2
        token = token[:place] + chr(code) + token[place + 1 :]
        expected = reference_decode(token)
        for _, decode in _pairs():
            assert decode(token) == expected, (decode, token)


def test_a_token_that_does_not_decode_is_malformed_and_a_long_one_is_refused_first() -> None:
    from lb.errors import InvalidToken

    for token in ("", "A" * 59 + "=", "AgAB" * 20 + "A", "x" * (codec.MAX_TOKEN_CHARS + 1)):
        with pytest.raises(InvalidToken) as caught:
            codec._decode(token)
        assert caught.value.reason == "malformed"
    with pytest.raises(InvalidToken):
        codec._decode(reference_encode(bytes(43)))  # one byte short of the shortest token
    assert codec._decode(reference_encode(bytes(44))) == bytes(44)


def test_the_c_pair_is_used_when_built_and_set_aside_by_lb_pure_python() -> None:
    token64 = pytest.importorskip(
        "lb.affinity._token64", reason="lb/affinity/_token64.c is not built (make native needs a C compiler)"
    )
    if pure_python_requested():
        pytest.skip("LB_PURE_PYTHON=1: the Python pair runs")
    assert codec._to_text is token64.encode and codec._from_text is token64.decode
    with pytest.raises(TypeError):
        token64.encode("text")
    with pytest.raises(TypeError):
        token64.decode(b"bytes")
    probe = ("import lb.affinity.codec as c; "
             "print(c._to_text is c._encode_in_python and c._from_text is c._decode_in_python)")
    env = {**os.environ, "LB_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr
