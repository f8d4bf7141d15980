"""lb.affinity._aead (C, OpenSSL's EVP with contexts kept per key) seals and opens as cryptography's AESGCM does.

The codec uses it when it is built and finds the OpenSSL Python's `_hashlib` loaded; else cryptography's
AESGCM, whose InvalidTag its open answers as None.  Both ways are held to AESGCM itself here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import pure_python_requested
from lb.affinity import codec

NOT_BUILT = "lb/affinity/_aead.c is not built (make native needs a C compiler), or found no OpenSSL"
aead = pytest.importorskip("lb.affinity._aead", reason=NOT_BUILT)

_keys = st.binary(min_size=32, max_size=32)
_nonces = st.binary(min_size=12, max_size=12)


def _opened(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(nonce, data, aad)
    except InvalidTag:
        return None


@settings(max_examples=400, deadline=None)
@given(key=_keys, nonce=_nonces, pieces=st.lists(st.binary(max_size=120), max_size=5), aad=st.binary(max_size=20))
def test_it_seals_as_cryptography_does_and_opens_what_it_sealed(
    key: bytes, nonce: bytes, pieces: list[bytes], aad: bytes
) -> None:
    """seal's bytes are the aad, the nonce, then what AESGCM.encrypt makes of the pieces joined."""
    data = b"".join(pieces)
    ours, theirs = aead.AesGcm(key), codec._CryptographyAead(key)
    sealed = ours.seal(nonce, aad, *pieces)
    assert sealed == aad + nonce + AESGCM(key).encrypt(nonce, data, aad) == theirs.seal(nonce, aad, *pieces)
    assert ours.open(sealed, len(aad)) == data == theirs.open(sealed, len(aad))
    assert ours.seal(nonce, aad, *pieces) == sealed, "the kept context is set afresh by each call"


@settings(max_examples=400, deadline=None)
@given(key=_keys, nonce=_nonces, data=st.binary(max_size=80), aad=st.binary(max_size=8), flip=st.integers(0, 10**6),
       where=st.sampled_from(["data", "aad", "nonce", "key"]))
def test_anything_changed_does_not_open(key: bytes, nonce: bytes, data: bytes, aad: bytes, flip: int,
                                        where: str) -> None:
    """A flipped bit in the ciphertext, its tag, the associated data, the nonce or the key: None, where
    cryptography raises InvalidTag; and the context opens the next good token after it."""
    sealed = AESGCM(key).encrypt(nonce, data, aad)
    parts = {"data": sealed, "aad": aad, "nonce": nonce, "key": key}
    if not parts[where]:
        return
    changed = bytearray(parts[where])
    changed[flip % len(changed)] ^= 1 << (flip % 8)
    parts[where] = bytes(changed)
    ours = aead.AesGcm(parts["key"])
    tampered = parts["aad"] + parts["nonce"] + parts["data"]
    assert ours.open(tampered, len(aad)) is None
    assert _opened(parts["key"], parts["nonce"], parts["data"], parts["aad"]) is None
    assert codec._CryptographyAead(parts["key"]).open(tampered, len(aad)) is None
    if where != "key":
        assert ours.open(aad + nonce + sealed, len(aad)) == data, "a failed open leaves the context to open the next"


@pytest.mark.parametrize("length", range(17))
@pytest.mark.parametrize("aad", [b"", b"\x03\x12\x34"])
def test_data_no_longer_than_a_tag(length: int, aad: bytes) -> None:
    """Bytes too short to hold a tag after the nonce open to None, as AESGCM refuses them; so do bytes too
    short to hold the nonce itself, where AESGCM is not asked (it refuses a nonce under 8 bytes otherwise)."""
    key, nonce = bytes(range(32)), bytes(12)
    sealed = AESGCM(key).encrypt(nonce, b"", aad)
    data = sealed[:length] if length <= 16 else sealed
    expected = _opened(key, nonce, data, aad)
    assert aead.AesGcm(key).open(aad + nonce + data, len(aad)) == expected
    assert codec._CryptographyAead(key).open(aad + nonce + data, len(aad)) == expected
    assert (expected == b"") is (length == 16)
    for short in range(len(aad) + len(nonce)):
        assert aead.AesGcm(key).open((aad + nonce)[:short], min(short, len(aad))) is None
        assert codec._CryptographyAead(key).open((aad + nonce)[:short], min(short, len(aad))) is None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: aead.AesGcm(bytes(16)), ValueError),  # AES-256 only: the token's
        (lambda: aead.AesGcm("k" * 32), TypeError),
        (lambda: aead.AesGcm(bytes(32)).seal(bytes(8), b"", b""), ValueError),  # the token's nonce is 12 bytes
        (lambda: aead.AesGcm(bytes(32)).open("x" * 40, 3), TypeError),
        (lambda: aead.AesGcm(bytes(32)).open(bytes(40), 41), ValueError),  # an aad longer than the bytes
        (lambda: aead.AesGcm(bytes(32)).open(bytes(40), -1), ValueError),
        (lambda: aead.AesGcm(bytes(32)).open(bytes(40)), TypeError),
        (lambda: aead.AesGcm.__new__(aead.AesGcm).open(bytes(40), 3), TypeError),  # never given its key
        (lambda: aead.AesGcm(bytes(32)).seal(bytes(12)), TypeError),
        (lambda: aead.AesGcm(bytes(32)).seal(bytes(12), b"", "x"), TypeError),
        (lambda: aead.AesGcm.__new__(aead.AesGcm).seal(bytes(12), b"", b""), TypeError),  # never given its key
    ],
)
def test_wrong_arguments_raise(call: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()  # type: ignore[operator]


def test_the_codec_uses_it_when_built_and_cryptography_under_lb_pure_python() -> None:
    if pure_python_requested():
        pytest.skip("LB_PURE_PYTHON=1: the codec uses cryptography")
    assert codec._AES_GCM is aead.AesGcm
    assert type(codec._derive("secret", 3).seal.__self__) is aead.AesGcm  # type: ignore[attr-defined]
    probe = ("import lb.affinity.codec as c; "
             "print(c._AES_GCM is None, type(c._derive('s', 3).seal.__self__).__name__)")
    env = {**os.environ, "LB_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "_CryptographyAead"], done.stderr
