"""The affinity token: which backend a client belongs to, sealed so clients can neither read nor forge it.

Layout, version 3 (sizes in bytes; then base64url without padding):

    version(1) | key id(2) | nonce(12) |
        AES-256-GCM( issued_at(6) | session(8) | id_len(1) | backend id | pool_len(1) | pool | app value )

`issued_at` is Unix time in milliseconds, big-endian.  Tokens are sealed as
version 3, or as version 2 with `affinity.token_version: 2` while instances that
cannot open 3 still share the traffic (a rolling upgrade from them, a rollback to
them).  Every layout opens, so an upgrade keeps every client's pin: version 2 is
the same with `issued_at(4)` in whole Unix seconds (sealed rounded up), and
version 1 also has no `pool_len | pool` (a pin valid for whichever pool reads it).

- The backend is named by its configured id, never its address, so a gateway
  that moves keeps its clients.
- The pool is sealed too: one client holds one pin per pool (a cookie value
  carries several tokens, see `lb.affinity.carriers`), and a pin for pool A can
  never be taken for one of pool B.
- `session` is random per client and survives re-issue: it is what redispatch
  hashes on, so one player's tabs land together.
- The key id picks the right key first during rotation; the first configured
  key seals, every configured key opens.
- AES-GCM with random 96-bit nonces stays within NIST's bound (2^32 messages
  per key) for any realistic cookie-issue rate between key rotations.
- `issued_at` is wall-clock time, so every balancer instance agrees on expiry, to the
  millisecond: sealed from the issuing instant floored to the millisecond (never in the future),
  a token opens until exactly `max_age` after it was issued.  (Version 2's whole seconds, rounded
  up so as never to expire early, let a token open for up to a second past `max_age`.)

Pure: randomness (`nonce`, `session`) and time (`now`) are arguments.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lb import built_in_c
from lb.errors import InvalidToken
from lb.state.rounding import round_half_even

if TYPE_CHECKING:
    from lb.affinity._aead import AesGcm

VERSION: Final = 3
_VERSIONS: Final = frozenset({1, 2, 3})
NONCE_BYTES: Final = 12
SESSION_BYTES: Final = 8
MAX_TOKEN_CHARS: Final = 4096  # longer than any token we issue; refuse before decoding
CLOCK_SKEW: Final = 300  # seconds a token may appear to come from the future (other instances' clocks)
# Why a token is treated as absent: lb_affinity_invalid_tokens_total{reason}, /lookup's `reason`
# (`unknown_backend` is the decision's: a valid token naming a backend no pool has).
INVALID_REASONS: Final = ("malformed", "unknown_key", "bad_mac", "expired", "future", "unknown_backend")

_HEADER: Final = struct.Struct(">BH")  # version, key id
_CLAIM: Final = struct.Struct(">6s8sB")  # issued_at (Unix ms, big-endian), session, backend id length
_SECONDS_CLAIM: Final = struct.Struct(">I8sB")  # versions 1 and 2: issued_at in whole Unix seconds
# Their sizes as constants, and all read by indexing (`_parse_claim`, `open`): compiled, a Struct's
# `size` is an attribute lookup and its `unpack_from` a method call and a tuple, 2,000 instructions a
# checked cookie between them; a test holds the readings equal.
_HEADER_SIZE: Final = 3
_CLAIM_SIZE: Final = 15
_SECONDS_CLAIM_SIZE: Final = 13  # also the shortest claim of any version
_TAG_BYTES: Final = 16
_TOKEN_CHARS: Final = re.compile(r"[A-Za-z0-9_-]+")  # base64url, no padding
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class Claim:
    """What a token says: the backend, when it was issued, and the client's session."""

    backend_id: str
    # Unix seconds, to the millisecond (a version-1 or -2 token's: whole seconds); `seal` rounds it
    # to the nearest millisecond, so a time floored to the millisecond is sealed as it is.
    issued_at: float
    session: bytes
    app_value: str | None  # rewrite mode: the backend's own cookie value
    pool: str | None  # None: a version-1 token, valid for any pool
    # Opened by a key other than the first (the one that seals): during a key rotation the next
    # handshake re-issues it under the new key, so old keys fall out of use as clients return.
    older_key: bool = field(default=False, compare=False)  # how it was opened, not what it says

    def __init__(
        self, backend_id: str, issued_at: float, session: bytes, app_value: str | None = None, pool: str | None = None,
        older_key: bool = False,
    ) -> None:
        self.backend_id = backend_id
        self.issued_at = issued_at
        self.session = session
        self.app_value = app_value
        self.pool = pool
        self.older_key = older_key

    def for_pool(self, pool: str) -> bool:
        """Whether this pin may route in `pool`."""
        return self.pool is None or self.pool == pool


class _Seal(Protocol):
    def __call__(self, nonce: bytes, aad: bytes, /, *data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: int
    # AES-256-GCM with this key: seal(nonce, aad, *data) -> aad | nonce | the ciphertext of the data joined |
    # its tag (a token's bytes, the header as aad); open(sealed, aad_length) -> the data of such bytes, or
    # None when the tag does not match.  Bound methods of lb.affinity._aead.AesGcm, or of `_CryptographyAead`.
    seal: _Seal
    open: Callable[[bytes, int], bytes | None]
    header: bytes  # version and key id, as every token this key seals begins (and authenticates)


class _CryptographyAead:
    """cryptography's AESGCM, answering as lb.affinity._aead's AesGcm: `seal` gives a token's bytes, and
    `open` takes them, answering None, not InvalidTag, for a tag that does not match.  Where that module
    is not built, or finds no OpenSSL loaded (LB_PURE_PYTHON=1)."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, aad: bytes, /, *data: bytes) -> bytes:
        return aad + nonce + self._aead.encrypt(nonce, b"".join(data), aad)

    def open(self, sealed: bytes, aad_length: int) -> bytes | None:
        if not 0 <= aad_length <= len(sealed):
            raise ValueError("open(): aad_length outside the sealed bytes")
        if len(sealed) - aad_length < NONCE_BYTES + _TAG_BYTES:
            return None  # too short for a nonce and a tag: no tag can match
        nonce_end = aad_length + NONCE_BYTES
        try:
            return self._aead.decrypt(sealed[aad_length:nonce_end], sealed[nonce_end:], sealed[:aad_length])
        except InvalidTag:
            return None


# lb.affinity._aead's AesGcm (OpenSSL contexts kept per key: 5,000 fewer instructions a seal or an open),
# or None: cryptography's AESGCM, through _CryptographyAead.
_AES_GCM: Final = cast("type[AesGcm] | None", built_in_c("lb.affinity._aead", "AesGcm"))


@functools.lru_cache(maxsize=4096)
def _sealed_names(backend_id: str, pool: str) -> tuple[bytes, bytes]:
    """The backend id, and `id_len | backend id | pool_len | pool` as sealed: once per backend, not per token.

    The length bytes are only meaningful for an id and a pool of at most 255 bytes (the caller checks).
    """
    backend = backend_id.encode("utf-8")
    pool_bytes = pool.encode("utf-8")
    return backend, bytes([min(len(backend), 255)]) + backend + bytes([min(len(pool_bytes), 255)]) + pool_bytes


def _derive(secret: str, version: int) -> _Key:
    material = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"lb affinity token v1"
    ).derive(secret.encode("utf-8"))
    key_id = int.from_bytes(hashlib.sha256(b"key id" + material).digest()[:2], "big")
    aead = _AES_GCM(material) if _AES_GCM is not None else _CryptographyAead(material)
    return _Key(key_id=key_id, seal=aead.seal, open=aead.open, header=_HEADER.pack(version, key_id))


class TokenCodec:
    """Seals and opens affinity tokens with a rotating list of secret keys."""

    __slots__ = ("_keys", "_max_age", "_seconds")

    def __init__(self, secret_keys: Sequence[str], max_age: float, seal_version: int = VERSION) -> None:
        """Args:
        secret_keys: the first seals; all of them open (rotation).
        max_age: seconds after issue when a token stops opening.
        seal_version: the layout sealed (`affinity.token_version`): 3, or 2 while instances that open
            only 1 and 2 still share the traffic (a rolling upgrade, a rollback); every version opens.
        """
        if not secret_keys:
            raise ValueError("at least one secret key is required")
        if seal_version not in (2, VERSION):
            raise ValueError(f"tokens are sealed as version 2 or {VERSION}, not {seal_version}")
        self._keys = tuple(_derive(secret, seal_version) for secret in secret_keys)
        self._max_age = max_age
        self._seconds = seal_version == 2

    def seal(self, claim: Claim, nonce: bytes) -> str:
        """Encrypt `claim` with the first key; `nonce` must be 12 fresh random bytes.

        Raises:
            ValueError: backend id or pool longer than 255 bytes, bad session or nonce length.
            TokenTooLarge: the sealed token would exceed MAX_TOKEN_CHARS (a huge app value).
        """
        return self.seal_fields(claim.backend_id, claim.issued_at, claim.session, claim.app_value, claim.pool, nonce)

    def seal_fields(
        self, backend_id: str, issued_at: float, session: bytes, app_value: str | None, pool: str | None, nonce: bytes
    ) -> str:
        """`seal` of the Claim these fields make, without making it (the connection core seals a new
        client's token from its decision's fields: a Claim made and freed for it cost about 350
        instructions a handshake).  Raises as `seal`."""
        backend, names = _sealed_names(backend_id, pool or "")
        if len(backend) > 255 or len(names) - len(backend) > 257:
            raise ValueError("claim does not fit the token layout")
        if len(session) != SESSION_BYTES or len(nonce) != NONCE_BYTES:
            raise ValueError("claim does not fit the token layout")
        app_bytes = app_value.encode("utf-8") if app_value is not None else b""
        claim_size = _SECONDS_CLAIM_SIZE if self._seconds else _CLAIM_SIZE
        fixed = _HEADER_SIZE + NONCE_BYTES + claim_size - 1 + len(names) + _TAG_BYTES  # names has the id length
        if base64_chars(fixed + len(app_bytes)) > MAX_TOKEN_CHARS:
            raise TokenTooLarge(len(app_bytes))
        key = self._keys[0]
        # _CLAIM's issued_at (rounded: an opened claim's is milliseconds / 1000, which a float may hold
        # a hair under the millisecond) and session; its id length begins `names`.
        if self._seconds:  # version 2: whole seconds, rounded up, so as never to expire early
            issued = math.ceil(round_half_even(issued_at * 1000) / 1000).to_bytes(4, "big")
        else:
            issued = round_half_even(issued_at * 1000).to_bytes(6, "big")
        # The token's bytes, header | nonce | AES-GCM(issued | session | names | app value), in one piece.
        return _to_text(key.seal(nonce, key.header, issued, session, names, app_bytes))

    def open(self, token: str, now: float) -> Claim:
        """Decrypt and check a token.

        Raises:
            InvalidToken: reason "malformed", "unknown_key", "bad_mac", "expired" or "future" (issued more
                than CLOCK_SKEW ahead of `now`: a clock is wrong, this instance's or the issuer's).
        """
        raw = _decode(token)
        version, key_id = raw[0], raw[1] << 8 | raw[2]  # _HEADER
        if version not in _VERSIONS:
            raise InvalidToken("malformed")
        # Each key of this id (two secrets may share one) tries the token's bytes where they lie: the header
        # its aad, then the nonce, the ciphertext and the tag (`_Key.open`).
        plaintext: bytes | None = None
        tried = False
        for key in self._keys:
            if key.key_id == key_id:
                tried = True
                plaintext = key.open(raw, _HEADER_SIZE)
                if plaintext is not None:
                    break
        if plaintext is None:
            raise InvalidToken("bad_mac" if tried else "unknown_key")
        claim = _parse_claim(plaintext, version, older_key=key is not self._keys[0])
        age = now - claim.issued_at
        if age > self._max_age:
            raise InvalidToken("expired")
        if age < -CLOCK_SKEW:
            # Not "expired": the operator's fix is a clock, not max_age.  Bounded, as a token from an
            # instance whose clock ran a year ahead would otherwise live a year past max_age.
            raise InvalidToken("future")
        return claim


class TokenTooLarge(ValueError):
    """The value to seal would make a token longer than MAX_TOKEN_CHARS (rewrite mode passes it unsealed)."""

    def __init__(self, app_bytes: int) -> None:
        super().__init__(f"a {app_bytes}-byte value does not fit in a {MAX_TOKEN_CHARS}-character token")
        self.app_bytes = app_bytes


def base64_chars(raw_bytes: int) -> int:
    """Length of unpadded base64 for `raw_bytes` bytes."""
    return (raw_bytes * 4 + 2) // 3


# What every token we seal or open looks like before it is opened: base64url, a version we open in
# its first byte (version 1: "A" then one of Q-f; version 2: "A" then one of g-v; version 3: "A" then
# one of w-z, 0-9, "-", "_"), and at least the length of the shortest token (version 1's header,
# nonce, tag and fixed claim: 44 bytes, 59 characters).
_SEALED_SHAPE: Final = re.compile(rf"A[Q-Za-z0-9_-][A-Za-z0-9_-]{{{base64_chars(44) - 2},{MAX_TOKEN_CHARS - 2}}}")


def looks_sealed(value: str) -> bool:
    """Whether `value` has the shape of a token we seal, whether or not it opens.

    Rewrite mode tells a broken token (tampered, sealed with a foreign key) from a backend's
    own session value by this: the first is treated as absent, the second passes unchanged.
    """
    return _SEALED_SHAPE.fullmatch(value) is not None


def _decode(token: str) -> bytes:
    # Length first: a hostile cookie of megabytes is refused before any pass over it.
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("malformed")
    raw = _from_text(token)
    if raw is None or len(raw) < _HEADER_SIZE + NONCE_BYTES + _TAG_BYTES + _SECONDS_CLAIM_SIZE:
        raise InvalidToken("malformed")
    return raw


def _decode_in_python(token: str) -> bytes | None:
    """lb/affinity/_token64.c's decode: the bytes of canonical unpadded base64url, else None."""
    # base64 decoders skip unknown characters; a token must be exactly what we issued.
    if not _TOKEN_CHARS.fullmatch(token):
        return None
    try:
        # bytes.translate, not str.translate: the str one walks a dict per character (~2 µs a token).
        raw = binascii.a2b_base64(token.encode("ascii").translate(_FROM_URLSAFE) + b"=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    # Only the canonical spelling: the last character's spare bits must be zero,
    # so one token has exactly one string form.
    return raw if _encode_in_python(raw) == token else None


def _encode_in_python(raw: bytes) -> str:
    """lb/affinity/_token64.c's encode: unpadded base64url, straight through binascii (base64's
    wrappers cost a call and a copy each)."""
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_TO_URLSAFE).decode("ascii")


# lb.affinity._token64's one pass each way, or (not built, or LB_PURE_PYTHON=1) the same in Python.
_to_text: Final = (
    cast("Callable[[bytes], str] | None", built_in_c("lb.affinity._token64", "encode")) or _encode_in_python
)
_from_text: Final = (
    cast("Callable[[str], bytes | None] | None", built_in_c("lb.affinity._token64", "decode")) or _decode_in_python
)


def _parse_claim(plaintext: bytes, version: int, *, older_key: bool) -> Claim:
    # Authenticated, so only our own (older or newer) layouts can arrive here;
    # still checked so a layout bug cannot turn into an exception upstream.
    issued_at: float
    if version >= 3:
        if len(plaintext) < _CLAIM_SIZE:
            raise InvalidToken("malformed")
        # _CLAIM, by indexing: issued_at (Unix ms, 6 bytes, big-endian), session (8), backend id length (1).
        issued_at = (
            plaintext[0] << 40 | plaintext[1] << 32 | plaintext[2] << 24 | plaintext[3] << 16 | plaintext[4] << 8
            | plaintext[5]
        ) / 1000
        session, id_len = plaintext[6:14], plaintext[14]
        rest = plaintext[_CLAIM_SIZE:]
    else:
        if len(plaintext) < _SECONDS_CLAIM_SIZE:
            raise InvalidToken("malformed")
        # _SECONDS_CLAIM, likewise: issued_at (whole Unix seconds, 4 bytes), session (8), backend id length (1).
        issued_at = float(plaintext[0] << 24 | plaintext[1] << 16 | plaintext[2] << 8 | plaintext[3])
        session, id_len = plaintext[4:12], plaintext[12]
        rest = plaintext[_SECONDS_CLAIM_SIZE:]
    if len(rest) < id_len:
        raise InvalidToken("malformed")
    backend_raw, rest = rest[:id_len], rest[id_len:]
    pool_raw: bytes | None = None
    if version >= 2:
        if not rest or len(rest) < 1 + rest[0]:
            raise InvalidToken("malformed")
        pool_raw, rest = rest[1 : 1 + rest[0]], rest[1 + rest[0] :]
    try:
        backend_id = backend_raw.decode("utf-8")
        pool = pool_raw.decode("utf-8") if pool_raw else None
        app_value = rest.decode("utf-8") if rest else None
    except UnicodeDecodeError:
        raise InvalidToken("malformed") from None
    return Claim(backend_id=backend_id, issued_at=issued_at, session=session, app_value=app_value, pool=pool,
                 older_key=older_key)
