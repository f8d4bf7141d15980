"""The affinity token: opaque, authenticated, expiring; anything else is treated as absent (InvalidToken)."""

from __future__ import annotations

import itertools
import math
import struct
from base64 import urlsafe_b64decode, urlsafe_b64encode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.affinity import codec
from lb.affinity.codec import (
    CLOCK_SKEW,
    MAX_TOKEN_CHARS,
    NONCE_BYTES,
    SESSION_BYTES,
    VERSION,
    Claim,
    TokenCodec,
    TokenTooLarge,
    base64_chars,
    looks_sealed,
)
from lb.errors import InvalidToken

MAX_AGE = 3600.0
ISSUED = 1_700_000_000
NONCE = bytes(range(NONCE_BYTES))
SESSION = b"\x01\x02\x03\x04\x05\x06\x07\x08"
CLAIM = Claim(backend_id="gw-1", issued_at=ISSUED, session=SESSION)
CODEC = TokenCodec(["current-secret"], MAX_AGE)
TOKEN = CODEC.seal(CLAIM, NONCE)


def b64(raw: bytes) -> str:
    return urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(token: str) -> bytes:
    return urlsafe_b64decode(token + "=" * (-len(token) % 4))


def reason_of(codec: TokenCodec, token: str, now: float = ISSUED) -> str:
    with pytest.raises(InvalidToken) as info:
        codec.open(token, now)
    return info.value.reason


# -- round trip -------------------------------------------------------------


@pytest.mark.parametrize(
    "claim",
    [
        CLAIM,
        Claim(backend_id="gw-2", issued_at=ISSUED, session=SESSION, app_value="JSESSIONID-value=abc"),
        Claim(backend_id="passerelle-é", issued_at=ISSUED, session=SESSION, app_value="sessão ☃"),
        Claim(backend_id="网关-一", issued_at=ISSUED, session=b"\x00" * SESSION_BYTES),
        Claim(backend_id="x" * 255, issued_at=ISSUED, session=b"\xff" * SESSION_BYTES, app_value=""),
        Claim(backend_id="", issued_at=0, session=SESSION),
    ],
    ids=["plain", "app value", "unicode and app value", "cjk id", "255-byte id and empty app value", "empty id"],
)
def test_round_trip(claim: Claim) -> None:
    """A sealed claim opens to exactly the same claim (backend, issue time, session, app value)."""
    codec = TokenCodec(["k"], float(2**33))
    token = codec.seal(claim, NONCE)
    opened = codec.open(token, claim.issued_at)
    if claim.app_value == "":
        # An empty app value has no bytes in the layout; it opens as absent.
        assert opened == Claim(claim.backend_id, claim.issued_at, claim.session, None)
    else:
        assert opened == claim


def test_another_instance_with_the_same_keys_opens_it() -> None:
    """Any balancer instance sharing the keys opens the token."""
    assert TokenCodec(["current-secret"], MAX_AGE).open(TOKEN, ISSUED + 10) == CLAIM


def test_token_is_url_safe_unpadded_text() -> None:
    """A token is base64url without padding, so it needs no quoting in a cookie."""
    assert set(TOKEN) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(TOKEN) < 200


@pytest.mark.parametrize(
    "claim, nonce",
    [
        (Claim(backend_id="x" * 256, issued_at=ISSUED, session=SESSION), NONCE),
        (Claim(backend_id="é" * 128, issued_at=ISSUED, session=SESSION), NONCE),
        (Claim(backend_id="gw-1", issued_at=ISSUED, session=b"short"), NONCE),
        (CLAIM, b"short"),
        (CLAIM, NONCE + b"x"),
        (Claim(backend_id="gw-1", issued_at=ISSUED, session=SESSION, pool="p" * 256), NONCE),
        (Claim(backend_id="gw-1", issued_at=ISSUED, session=SESSION, pool="é" * 128), NONCE),
    ],
    ids=["id over 255 bytes", "id over 255 utf-8 bytes", "short session", "short nonce", "long nonce",
         "pool over 255 bytes", "pool over 255 utf-8 bytes"],
)
def test_seal_refuses_claims_that_do_not_fit(claim: Claim, nonce: bytes) -> None:
    """seal raises ValueError for claims or nonces the layout cannot hold."""
    with pytest.raises(ValueError):
        CODEC.seal(claim, nonce)


def test_codec_needs_a_key() -> None:
    """A codec without any secret key is refused."""
    with pytest.raises(ValueError):
        TokenCodec([], MAX_AGE)


# -- time -------------------------------------------------------------------


@pytest.mark.parametrize("age", [0.0, 1.0, MAX_AGE / 2, MAX_AGE - 0.001, MAX_AGE])
def test_token_opens_up_to_max_age(age: float) -> None:
    """A token opens until max_age seconds after issue, the boundary included."""
    assert CODEC.open(TOKEN, ISSUED + age) == CLAIM


@pytest.mark.parametrize("age", [MAX_AGE + 0.001, MAX_AGE + 1, 10 * MAX_AGE])
def test_token_past_max_age_is_expired(age: float) -> None:
    """An expired token is treated as absent (reason "expired")."""
    assert reason_of(CODEC, TOKEN, ISSUED + age) == "expired"


@pytest.mark.parametrize("ahead", [1.0, CLOCK_SKEW - 1, CLOCK_SKEW])
def test_token_slightly_from_the_future_opens(ahead: float) -> None:
    """Another instance's clock may be up to CLOCK_SKEW seconds ahead."""
    assert CODEC.open(TOKEN, ISSUED - ahead) == CLAIM


@pytest.mark.parametrize("ahead", [CLOCK_SKEW + 0.001, CLOCK_SKEW + 1, 86400])
def test_token_from_beyond_clock_skew_is_invalid(ahead: float) -> None:
    """A token issued further in the future than CLOCK_SKEW is not honoured, and says why: a clock is wrong
    (it said "expired", pointing at max_age)."""
    assert reason_of(CODEC, TOKEN, ISSUED - ahead) == "future"


# -- milliseconds (version 3) and the layouts before it ----------------------------------------------

ISSUED_MS = ISSUED + 0.123  # an issue time with a fraction of a second, as the proxy seals them
MS_CLAIM = Claim(backend_id="gw-1", issued_at=ISSUED_MS, session=SESSION, pool="gateways")
MS_TOKEN = CODEC.seal(MS_CLAIM, NONCE)


def test_tokens_are_sealed_as_version_3_with_the_issue_time_in_milliseconds() -> None:
    """The claim carries the issue time as 6 bytes of big-endian Unix milliseconds, where version 2 had
    4 bytes of seconds: the token is 2 bytes longer, and the rest of the layout is unchanged."""
    raw = unb64(MS_TOKEN)
    assert raw[0] == VERSION == 3
    key = codec._derive("current-secret", 3)
    plaintext = key.open(raw, 3)
    assert plaintext is not None and plaintext[:6] == (1_700_000_000_123).to_bytes(6, "big")
    assert plaintext[6:] == SESSION + b"\x04gw-1" + b"\x08gateways"
    assert len(raw) == len(_sealed_as(2, MS_CLAIM)) + 2


def test_an_issue_time_keeps_its_milliseconds() -> None:
    """A version-3 token opens to its issue time to the millisecond, not to the second."""
    opened = CODEC.open(MS_TOKEN, ISSUED_MS)
    assert opened.issued_at == ISSUED_MS == 1_700_000_000.123
    assert opened == MS_CLAIM


@pytest.mark.parametrize("ms", [0, 1, 123, 499, 500, 501, 999])
def test_sealing_an_opened_claim_keeps_its_issue_time(ms: int) -> None:
    """`seal` rounds to the millisecond: an opened claim (milliseconds / 1000, which a float may hold a hair
    under the millisecond) is sealed again with exactly its own issue time."""
    for issued_at in ((ISSUED * 1000 + ms) / 1000, ISSUED + ms / 1000, ISSUED + ms * 0.001):
        claim = Claim(backend_id="gw-1", issued_at=issued_at, session=SESSION)
        opened = CODEC.open(CODEC.seal(claim, NONCE), issued_at)
        assert round(opened.issued_at * 1000) == ISSUED * 1000 + ms
        assert CODEC.open(CODEC.seal(opened, NONCE), issued_at).issued_at == opened.issued_at


@pytest.mark.parametrize("max_age", [1.0, 2.0, 0.5, MAX_AGE])
def test_a_token_expires_exactly_max_age_after_it_was_issued_to_the_millisecond(max_age: float) -> None:
    """SPEC: expired after max_age.  To the millisecond, whatever the fraction of its issue second: valid
    1 ms before max_age has passed, expired 1 ms after (whole seconds let it open up to 1 s longer)."""
    codec_ = TokenCodec(["current-secret"], max_age)
    for fraction in (0.0, 0.001, 0.123, 0.5, 0.999):
        claim = Claim(backend_id="gw-1", issued_at=ISSUED + fraction, session=SESSION, pool="gateways")
        token = codec_.seal(claim, NONCE)
        assert codec_.open(token, ISSUED + fraction + max_age - 0.001) == claim
        assert reason_of(codec_, token, ISSUED + fraction + max_age + 0.001) == "expired"


def _sealed_as(version: int, claim: Claim, secret: str = "current-secret") -> bytes:
    """`claim` sealed in an earlier layout (1: no pool; 2: with its pool), issue time in whole seconds, as
    builds before version 3 sealed it (rounded up)."""
    key = codec._derive(secret, version)
    header = struct.pack(">BH", version, key.key_id)
    backend, pool = claim.backend_id.encode(), (claim.pool or "").encode()
    plaintext = codec._SECONDS_CLAIM.pack(math.ceil(claim.issued_at), claim.session, len(backend)) + backend
    if version >= 2:
        plaintext += bytes([len(pool)]) + pool
    plaintext += (claim.app_value or "").encode()
    return key.seal(NONCE, header, plaintext)


@pytest.mark.parametrize("version", [1, 2])
def test_tokens_of_earlier_layouts_open_and_expire_as_before(version: int) -> None:
    """Rolling upgrade: a version-1 or -2 token (whole seconds) still opens, to the same claim, until max_age
    after its issue second, and is expired past it, exactly as before."""
    claim = Claim(backend_id="gw-1", issued_at=ISSUED, session=SESSION, app_value="app",
                  pool="gateways" if version == 2 else None)
    token = b64(_sealed_as(version, claim))
    assert looks_sealed(token)
    for age in (0.0, 1.0, MAX_AGE - 0.001, MAX_AGE):
        opened = CODEC.open(token, ISSUED + age)
        assert opened == claim and opened.issued_at == ISSUED
    for age in (MAX_AGE + 0.001, MAX_AGE + 1):
        assert reason_of(CODEC, token, ISSUED + age) == "expired"
    assert reason_of(CODEC, token, ISSUED - CLOCK_SKEW - 0.001) == "future"


def test_version_2_is_sealed_when_asked_as_an_earlier_build_sealed_it() -> None:
    """`affinity.token_version: 2`, while earlier builds share the traffic: the token is byte for byte the
    layout they seal (whole seconds, rounded up) and open, and this build opens both versions."""
    old_layout = TokenCodec(["current-secret"], MAX_AGE, seal_version=2)
    token = old_layout.seal(MS_CLAIM, NONCE)
    assert unb64(token) == _sealed_as(2, MS_CLAIM)
    assert unb64(token)[0] == 2 and looks_sealed(token)
    assert CODEC.open(token, ISSUED + 1).issued_at == ISSUED + 1  # 0.123 rounded up, as version 2 is
    assert old_layout.open(MS_TOKEN, ISSUED + 1) == MS_CLAIM
    for seal_version in (1, 4):
        with pytest.raises(ValueError, match="version 2 or 3"):
            TokenCodec(["current-secret"], MAX_AGE, seal_version=seal_version)


def test_every_version_we_open_has_the_shape_of_our_tokens() -> None:
    """Rewrite mode tells a broken token from a backend's own value by its shape: a version-3 token has it
    whatever its key id, as versions 1 and 2 do."""
    for secret in ("current-secret", "k1", "k2", "k3", "k4", "k5"):
        token = TokenCodec([secret], MAX_AGE).seal(MS_CLAIM, NONCE)
        assert token[0] == "A" and token[1] in "wxyz0123456789-_" and looks_sealed(token), token
        assert looks_sealed(b64(_sealed_as(1, CLAIM, secret))) and looks_sealed(b64(_sealed_as(2, MS_CLAIM, secret)))


# -- keys -------------------------------------------------------------------


def test_rotation_old_token_opens_with_new_and_old_keys() -> None:
    """After rotation ([new, old]) tokens sealed with the old key still open."""
    old_token = TokenCodec(["old"], MAX_AGE).seal(CLAIM, NONCE)
    rotated = TokenCodec(["new", "old"], MAX_AGE)
    opened = rotated.open(old_token, ISSUED)
    assert opened == CLAIM and opened.older_key, "the proxy re-issues it under the new key"
    new_token = rotated.seal(CLAIM, NONCE)
    assert not rotated.open(new_token, ISSUED).older_key
    assert TokenCodec(["new"], MAX_AGE).open(new_token, ISSUED) == CLAIM
    assert reason_of(TokenCodec(["old"], MAX_AGE), new_token) in {"unknown_key", "bad_mac"}


def test_retired_key_no_longer_opens() -> None:
    """A token sealed with a key no longer listed is treated as absent."""
    old_token = TokenCodec(["old"], MAX_AGE).seal(CLAIM, NONCE)
    assert reason_of(TokenCodec(["new"], MAX_AGE), old_token) in {"unknown_key", "bad_mac"}


def _sharing_a_key_id() -> tuple[str, str]:
    """Two secrets whose keys have one key id (16 bits: a few hundred secrets hold such a pair)."""
    seen: dict[int, str] = {}
    for number in itertools.count():
        secret = f"secret-{number}"
        key_id = codec._derive(secret, 3).key_id
        if key_id in seen:
            return seen[key_id], secret
        seen[key_id] = secret
    raise AssertionError("unreachable")


def test_a_token_is_tried_with_every_key_of_its_key_id_and_told_apart_from_an_unknown_one() -> None:
    """`unknown_key` when no configured key has the token's id; `bad_mac` when one has and it does not open;
    two secrets that share an id both open theirs (the first key seals, the other's opens as older)."""
    first, second = _sharing_a_key_id()
    both = TokenCodec([first, second], MAX_AGE)
    assert not both.open(TokenCodec([first], MAX_AGE).seal(CLAIM, NONCE), ISSUED).older_key
    assert both.open(TokenCodec([second], MAX_AGE).seal(CLAIM, NONCE), ISSUED).older_key
    raw = bytearray(unb64(TokenCodec([second], MAX_AGE).seal(CLAIM, NONCE)))
    raw[-1] ^= 1  # the tag
    assert reason_of(both, b64(bytes(raw))) == "bad_mac"
    raw[1:3] = ((int.from_bytes(raw[1:3], "big") + 1) % 65536).to_bytes(2, "big")  # an id neither key has
    assert reason_of(both, b64(bytes(raw))) == "unknown_key"


@pytest.mark.parametrize("secret", ["attacker", "current-secret ", "Current-secret", "current-secre"])
def test_foreign_key_is_invalid(secret: str) -> None:
    """A token sealed with any other key (even a near-miss) is treated as absent."""
    foreign = TokenCodec([secret], MAX_AGE).seal(CLAIM, NONCE)
    assert reason_of(CODEC, foreign) in {"unknown_key", "bad_mac"}


# -- tampering and junk -----------------------------------------------------

_RAW = unb64(TOKEN)


@pytest.mark.parametrize("position", range(len(_RAW)))
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_tampering_any_byte_is_invalid(position: int, mask: int) -> None:
    """Changing any bit of the decoded token (header, nonce, ciphertext or tag) is detected."""
    tampered = bytearray(_RAW)
    tampered[position] ^= mask
    assert reason_of(CODEC, b64(bytes(tampered))) in {"malformed", "unknown_key", "bad_mac"}


@pytest.mark.parametrize("cut", [1, 2, 16, len(_RAW) // 2, len(_RAW) - 1])
def test_truncated_or_extended_token_is_invalid(cut: int) -> None:
    """A token with bytes removed from its end or appended is treated as absent."""
    with pytest.raises(InvalidToken):
        CODEC.open(b64(_RAW[:-cut]), ISSUED)
    with pytest.raises(InvalidToken):
        CODEC.open(b64(_RAW + _RAW[:cut]), ISSUED)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "A",
        "AAAA",
        TOKEN + "=",
        TOKEN + "==",
        TOKEN[:5] + "+" + TOKEN[6:],
        TOKEN[:5] + "/" + TOKEN[6:],
        TOKEN[:10] + " " + TOKEN[10:],
        TOKEN[:10] + "." + TOKEN[10:],
        TOKEN[:10] + "\x00" + TOKEN[10:],
        TOKEN[:10] + "é" + TOKEN[10:],
        TOKEN[:10] + "\n" + TOKEN[10:],
        " " + TOKEN,
        TOKEN + " ",
        '"' + TOKEN + '"',
        "A" * (MAX_TOKEN_CHARS + 1),
        TOKEN + "A" * MAX_TOKEN_CHARS,
        "A" * MAX_TOKEN_CHARS,
        TOKEN + "A" * ((1 - len(TOKEN)) % 4),
    ],
    ids=[
        "empty",
        "one char",
        "four chars",
        "padding",
        "double padding",
        "plus",
        "slash",
        "space",
        "dot",
        "NUL",
        "non-ASCII",
        "newline",
        "leading space",
        "trailing space",
        "quoted",
        "overlong junk",
        "overlong token",
        "max length junk",
        "length 4n+1",
    ],
)
def test_malformed_tokens_are_invalid(token: str) -> None:
    """Padding, foreign characters, bad lengths and junk are treated as absent."""
    assert reason_of(CODEC, token) in {"malformed", "unknown_key", "bad_mac"}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "A",
        TOKEN + "=",
        TOKEN[:10] + " " + TOKEN[10:],
        TOKEN[:10] + "é" + TOKEN[10:],
        "A" * (MAX_TOKEN_CHARS + 1),
        TOKEN + "A" * ((1 - len(TOKEN)) % 4),
        TOKEN[:40],
        TOKEN[:4] + "A" * MAX_TOKEN_CHARS,  # our version and key id, then zeros: canonical base64, too long
    ],
    ids=["empty", "one char", "padding", "space", "non-ASCII", "overlong", "length 4n+1", "too short",
         "overlong with our header"],
)
def test_malformed_reason(token: str) -> None:
    """Text that is not a token at all is counted as "malformed"."""
    assert reason_of(CODEC, token) == "malformed"


@pytest.mark.parametrize("version", [0, 4, 255])
def test_wrong_version_is_malformed(version: int) -> None:
    """A token of another layout version is "malformed"."""
    raw = bytearray(_RAW)
    raw[0] = version
    assert reason_of(CODEC, b64(bytes(raw))) == "malformed"


# -- opacity ----------------------------------------------------------------


def _encodings(text: str) -> set[str]:
    """`text` in clear and in base64url at every byte alignment, minus the edge characters."""
    raw = text.encode("utf-8")
    found = {text}
    for shift in range(3):
        encoded = b64(b"\x00" * shift + raw)
        found.add(encoded[2 if shift else 0 : -2])
    found.add(urlsafe_b64encode(raw).decode().rstrip("="))
    return {part for part in found if len(part) >= 6}


@pytest.mark.parametrize(
    "backend_id", ["gateway-one", "127.0.0.1:9001", "gw-2.internal.example:9443", "passerelle-européenne"]
)
def test_token_does_not_reveal_backend(backend_id: str) -> None:
    """The token names the backend only in encrypted form: neither id nor address shows, in clear or base64."""
    for secret in ("k1", "k2", "k3"):
        for nonce in (NONCE, b"\xff" * NONCE_BYTES, bytes(NONCE_BYTES)):
            claim = Claim(backend_id=backend_id, issued_at=ISSUED, session=SESSION, app_value="app-session-value")
            token = TokenCodec([secret], MAX_AGE).seal(claim, nonce)
            raw = unb64(token)
            for needle in _encodings(backend_id) | _encodings("app-session-value"):
                assert needle not in token
            assert backend_id.encode() not in raw
            assert b"app-session-value" not in raw


def test_two_seals_of_the_same_claim_differ() -> None:
    """Fresh nonces make every token for the same claim different (no linkable tokens)."""
    other = CODEC.seal(CLAIM, b"\x42" * NONCE_BYTES)
    assert other != TOKEN
    assert CODEC.open(other, ISSUED) == CODEC.open(TOKEN, ISSUED) == CLAIM


# -- hypothesis -------------------------------------------------------------

_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# Random text of the base64url alphabet is canonical base64url of 44 bytes or more (the shortest token) too
# rarely to be opened past its shape (300 of 300 examples were "malformed"): a quarter of the tokens are
# base64url of random bytes, with a version byte we issue half the time (its key id unknown), and a quarter
# carry our own header (version and key id), so that they are opened as far as the MAC.
_HEADER_RAW = unb64(TOKEN)[: codec._HEADER_SIZE]
_MIN_RAW = codec._HEADER_SIZE + NONCE_BYTES + codec._TAG_BYTES + codec._SECONDS_CLAIM_SIZE  # what `open` decrypts
_random_tokens = st.one_of(
    st.text(max_size=120),
    st.text(_B64_CHARS, max_size=120),
    st.tuples(st.sampled_from([0, 1, 2, 3, 255]), st.binary(min_size=_MIN_RAW - 1, max_size=89)).map(
        lambda drawn: b64(bytes([drawn[0]]) + drawn[1])
    ),
    st.binary(min_size=_MIN_RAW - len(_HEADER_RAW), max_size=90 - len(_HEADER_RAW)).map(
        lambda rest: b64(_HEADER_RAW + rest)
    ),
)


@settings(max_examples=300, deadline=None)
@given(token=_random_tokens)
def test_random_strings_only_raise_invalid_token(token: str) -> None:
    """Arbitrary text never opens and never raises anything but InvalidToken."""
    with pytest.raises(InvalidToken):
        CODEC.open(token, ISSUED)


# 49 raw bytes: the last base64 character carries 4 unused bits.
_ODD_CLAIM = Claim(backend_id="gw-12", issued_at=ISSUED, session=SESSION)
_ODD_TOKEN = CODEC.seal(_ODD_CLAIM, NONCE)

_edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "replace"]),
        st.integers(min_value=0, max_value=len(TOKEN)),
        st.sampled_from([*_B64_CHARS, "=", "+", "/", " ", "é"]),
    ),
    min_size=1,
    max_size=4,
)


def _apply(token: str, edits: list[tuple[str, int, str]]) -> str:
    chars = list(token)
    for kind, position, char in edits:
        index = min(position, max(len(chars) - 1, 0))
        if kind == "insert":
            chars.insert(position if position <= len(chars) else len(chars), char)
        elif not chars:
            continue
        elif kind == "delete":
            del chars[index]
        elif kind == "replace":
            chars[index] = char
        else:
            chars[index] = chr(ord(chars[index]) ^ 1)
    return "".join(chars)


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([(TOKEN, CLAIM), (_ODD_TOKEN, _ODD_CLAIM)]), edits=_edits)
def test_mutated_token_never_opens_to_another_claim(base: tuple[str, Claim], edits: list[tuple[str, int, str]]) -> None:
    """Flipped, inserted, deleted or replaced characters give InvalidToken, or at most the same claim."""
    token, original = base
    mutated = _apply(token, edits)
    try:
        claim = CODEC.open(mutated, ISSUED)
    except InvalidToken as exc:
        assert exc.reason in {"malformed", "unknown_key", "bad_mac", "expired", "future"}
        return
    # Only an identity edit, or the unused low bits of the last base64 character, leave the bytes unchanged.
    assert claim == original
    assert unb64(mutated) == unb64(token)


# Names of any text, and long ones of one- to four-byte characters, about as often under 255 bytes as over.
_names = st.text(max_size=40) | st.text(st.sampled_from("a-\u00e9\u20ac\U0001f600"), min_size=60, max_size=140)


@settings(max_examples=100, deadline=None)
@given(
    backend_id=_names,
    pool=st.none() | _names.filter(bool),
    app_value=st.none() | st.text(min_size=1, max_size=40) | st.integers(2900, 3100).map(lambda size: "v" * size),
    issued_at=st.integers(min_value=0, max_value=2**48 - 1).map(lambda ms: ms / 1000),  # what 6 bytes of ms hold
    session=st.binary(min_size=SESSION_BYTES, max_size=SESSION_BYTES),
    nonce=st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
)
def test_round_trip_any_claim(
    backend_id: str, pool: str | None, app_value: str | None, issued_at: float, session: bytes, nonce: bytes
) -> None:
    """Any claim that fits the layout opens to itself; an id or pool over 255 bytes is a ValueError, an app
    value that would make the token too long for `open` is TokenTooLarge."""
    claim = Claim(backend_id=backend_id, issued_at=issued_at, session=session, app_value=app_value, pool=pool)
    if len(backend_id.encode("utf-8")) > 255 or len((pool or "").encode("utf-8")) > 255:
        with pytest.raises(ValueError, match="does not fit the token layout"):
            CODEC.seal(claim, nonce)
        return
    try:
        token = CODEC.seal(claim, nonce)
    except TokenTooLarge:
        assert app_value is not None and len(app_value) >= 2900
        return
    assert len(token) <= MAX_TOKEN_CHARS
    assert CODEC.open(token, issued_at) == claim


def test_the_layouts_sizes_are_their_structs() -> None:
    """`open` and `_parse_claim` read the header and the claim by indexing, with sizes as constants."""
    assert codec._HEADER.size == codec._HEADER_SIZE and codec._CLAIM.size == codec._CLAIM_SIZE
    assert codec._SECONDS_CLAIM.size == codec._SECONDS_CLAIM_SIZE


@settings(max_examples=300, deadline=None)
@given(issued_ms=st.integers(0, 2**48 - 1), session=st.binary(min_size=SESSION_BYTES, max_size=SESSION_BYTES))
def test_a_claim_is_read_as_its_struct_writes_it(issued_ms: int, session: bytes) -> None:
    plaintext = codec._CLAIM.pack(issued_ms.to_bytes(6, "big"), session, 2) + b"b1" + b"\x01p"
    claim = codec._parse_claim(plaintext, 3, older_key=False)
    assert (claim.issued_at, claim.session, claim.backend_id, claim.pool) == (issued_ms / 1000, session, "b1", "p")


@settings(max_examples=300, deadline=None)
@given(issued_at=st.integers(0, 2**32 - 1), session=st.binary(min_size=SESSION_BYTES, max_size=SESSION_BYTES))
def test_a_version_2_claim_is_read_as_its_struct_writes_it(issued_at: int, session: bytes) -> None:
    plaintext = codec._SECONDS_CLAIM.pack(issued_at, session, 2) + b"b1" + b"\x01p"
    claim = codec._parse_claim(plaintext, 2, older_key=False)
    assert (claim.issued_at, claim.session, claim.backend_id, claim.pool) == (issued_at, session, "b1", "p")


def test_a_value_is_refused_exactly_when_its_token_would_pass_max_token_chars() -> None:
    """Rewrite mode seals the backend's own value: the largest that fits makes a token of at most
    MAX_TOKEN_CHARS, and one byte more is refused (TokenTooLarge), not sealed into a longer one."""
    claim_bytes = 3 + NONCE_BYTES + 6 + SESSION_BYTES + 1 + len("gw-1") + 1 + len("p") + 16  # all but the value
    outcomes = []
    for size in range(3000, 3100):
        claim = Claim(backend_id="gw-1", issued_at=ISSUED, session=SESSION, app_value="v" * size, pool="p")
        fits = base64_chars(claim_bytes + size) <= MAX_TOKEN_CHARS
        try:
            token = CODEC.seal(claim, NONCE)
        except TokenTooLarge:
            outcomes.append(False)
            assert not fits, size
            continue
        outcomes.append(True)
        assert fits and len(token) == base64_chars(claim_bytes + size), size
    assert True in outcomes and False in outcomes
