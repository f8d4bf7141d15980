"""lb.control.lookup: the /lookup answer, computed by the data path's decide() without side effects."""

from __future__ import annotations

import os

import pytest

from lb.affinity.balancing import BadKey
from lb.affinity.carriers import find_token
from lb.affinity.codec import NONCE_BYTES, Claim, TokenCodec
from lb.affinity.decision import decide, route_for_key
from lb.config.model import AffinityConfig, BackendConfig, BalanceMethod, PoolConfig
from lb.control.lookup import iso_utc, lookup_token
from lb.http.head import parse_request_head
from lb.state.pool import AdminAction, PoolState

NOW = 1_800_000_000.0
KEY = "unit-test-key-0123456789"


def pools(*names: str, balance: BalanceMethod = BalanceMethod.ROUND_ROBIN) -> dict[str, PoolState]:
    backends = tuple(BackendConfig(id=f"gw-{i}", host="127.0.0.1", port=9000 + i) for i in (1, 2, 3))
    return {name: PoolState(PoolConfig(name=name, backends=backends, balance=balance)) for name in names}


def seal(backend: str, issued_at: float = NOW - 10, key: str = KEY, session: bytes = b"s" * 8) -> str:
    claim = Claim(backend_id=backend, issued_at=int(issued_at), session=session)
    return TokenCodec([key], 3600).seal(claim, os.urandom(NONCE_BYTES))


def answer(token: str, state: dict[str, PoolState], **kwargs: object) -> dict[str, object]:
    return lookup_token(token, TokenCodec([KEY], 3600), state, now=NOW, max_age=3600, **kwargs)  # type: ignore[arg-type]


def test_valid_token_routes_to_its_backend() -> None:
    result = answer(seal("gw-2"), pools("gateways"))
    assert result == {
        "valid": True, "pool": "gateways", "backend": "gw-2", "state": "up", "routes_to": "gw-2",
        "issued_at": iso_utc(NOW - 10), "expires_at": iso_utc(NOW - 10 + 3600),
    }


def test_draining_backend_keeps_its_sessions() -> None:
    state = pools("gateways")
    state["gateways"].apply_admin("gw-2", AdminAction.DRAIN, NOW)
    assert answer(seal("gw-2"), state)["routes_to"] == "gw-2"


@pytest.mark.parametrize("action", [AdminAction.DISABLE])
def test_disabled_backend_routes_where_redispatch_goes_and_changes_nothing(action: AdminAction) -> None:
    """Redispatch hashes the session over the survivors: the same answer every time, no policy state touched."""
    state = pools("gateways", balance=BalanceMethod.ROUND_ROBIN)
    state["gateways"].apply_admin("gw-2", action, NOW)
    token = seal("gw-2")
    policy_before = dict(state["gateways"].policy._current)  # type: ignore[union-attr]
    first = answer(token, state)
    assert first["state"] == "disabled" and first["routes_to"] in ("gw-1", "gw-3")
    assert all(answer(token, state) == first for _ in range(5))
    assert state["gateways"].policy._current == policy_before  # type: ignore[union-attr]
    # Another instance with the same view agrees.
    other = pools("gateways")
    other["gateways"].apply_admin("gw-2", action, NOW)
    assert answer(token, other)["routes_to"] == first["routes_to"]


def test_no_backend_left_routes_nowhere() -> None:
    state = pools("gateways")
    for backend in ("gw-1", "gw-2", "gw-3"):
        state["gateways"].apply_admin(backend, AdminAction.DISABLE, NOW)
    result = answer(seal("gw-1"), state)
    assert result["valid"] is True and result["routes_to"] is None


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (seal("gw-1", issued_at=NOW - 7200), "expired"),
        (seal("gw-1", key="someone else's key 000000"), "unknown_key"),
        ("", "malformed"),
        ("%%%", "malformed"),
        (seal("gw-9"), "unknown_backend"),
    ],
    ids=["expired", "other-key", "empty", "not-base64", "unknown-backend"],  # a sealed token differs per run
)
def test_invalid_tokens(token: str, reason: str) -> None:
    assert answer(token, pools("gateways")) == {"valid": False, "reason": reason}


def test_tampered_token_is_bad_mac() -> None:
    token = seal("gw-1")
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert answer(tampered, pools("gateways")) == {"valid": False, "reason": "bad_mac"}


def test_pool_parameter_picks_the_pool() -> None:
    state = pools("chat", "gateways")
    assert answer(seal("gw-1"), state)["pool"] == "chat"  # first in config order
    assert answer(seal("gw-1"), state, pool="gateways")["pool"] == "gateways"
    assert answer(seal("gw-1"), state, pool="nope") == {"valid": False, "reason": "unknown_backend"}


def test_iso_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"


def seal_for(pool: str, backend: str, session: bytes = b"p" * 8, issued_at: float = NOW - 10) -> str:
    claim = Claim(backend_id=backend, issued_at=int(issued_at), session=session, pool=pool)
    return TokenCodec([KEY], 3600).seal(claim, os.urandom(NONCE_BYTES))


def test_a_pin_sealed_for_a_pool_is_looked_up_in_that_pool() -> None:
    """Two pools over the same gateways: the pin's own pool answers, not the first with that backend id."""
    state = pools("gateways", "plain")
    state["gateways"].apply_admin("gw-2", AdminAction.DISABLE, NOW - 1)
    result = answer(seal_for("plain", "gw-2"), state)
    assert (result["pool"], result["backend"], result["state"], result["routes_to"]) == ("plain", "gw-2", "up", "gw-2")


def test_a_cookie_value_with_one_pin_per_pool_is_understood() -> None:
    """The affinity cookie of a client using two pools carries two pins; /lookup takes the value as is."""
    state = pools("gateways", "plain")
    value = ".".join([seal_for("gateways", "gw-1"), seal_for("plain", "gw-3")])
    assert answer(value, state, pool="plain")["backend"] == "gw-3"
    assert answer(value, state, pool="gateways")["backend"] == "gw-1"
    first = answer(value, state)
    assert (first["pool"], first["backend"]) == ("gateways", "gw-1")
    assert answer(value + ".garbage", state, pool="plain")["backend"] == "gw-3"
    # A valid pin, for another pool: nothing is wrong with it, the client has no pin in this one.
    assert answer(seal_for("gateways", "gw-1"), state, pool="plain") == {"valid": False, "reason": "no_pin_for_pool"}
    assert answer("x" * 40 + "." + seal_for("gateways", "gw-1"), state, pool="plain")["reason"] == "no_pin_for_pool"
    assert answer("x" * 40 + "." + "y" * 40, state)["valid"] is False


def test_of_two_pins_for_one_pool_the_youngest_is_answered_for_as_the_data_path_routes_by_it() -> None:
    """A value the balancer never builds, but a client may send: the answer is where its handshake goes."""
    state = pools("gateways", "plain")
    old, young = seal_for("gateways", "gw-1", issued_at=NOW - 100), seal_for("gateways", "gw-2", issued_at=NOW - 10)
    value = ".".join([old, seal_for("plain", "gw-3"), young])
    routed = find_token(parse_request_head(f"GET /ws HTTP/1.1\r\nHost: lb\r\nCookie: LB_AFFINITY={value}\r\n\r\n"
                                           .encode()), AffinityConfig(secret_keys=(KEY,)), TokenCodec([KEY], 3600), NOW,
                        pool="gateways")
    assert routed.claim is not None and routed.claim.backend_id == "gw-2"
    assert answer(value, state, pool="gateways")["backend"] == "gw-2"
    assert answer(value, state)["backend"] == "gw-2"  # the first pin's pool, and its youngest pin
    assert answer(value, state, pool="plain")["backend"] == "gw-3"
    assert answer(".".join([young, old]), state)["backend"] == "gw-2"


def hashed_pool(balance: BalanceMethod, *, sticky: bool = True) -> dict[str, PoolState]:
    backends = tuple(BackendConfig(id=f"gw-{i}", host="127.0.0.1", port=9000 + i) for i in (1, 2, 3, 4))
    config = PoolConfig(name="hp", backends=backends, balance=balance, sticky=sticky)
    return {"hp": PoolState(config)}


@pytest.mark.parametrize("balance", [BalanceMethod.HASH, BalanceMethod.SOURCE])
def test_in_a_hashed_pool_a_pin_that_no_longer_holds_routes_by_the_clients_key(balance: BalanceMethod) -> None:
    """The data path redispatches by the client's key there, not by the session: /lookup says so
    without a key, and answers what /route answers for the key with one (reviewer's case: 10 of 12
    users were named another gateway than the one they reached)."""
    state = hashed_pool(balance)
    state["hp"].apply_admin("gw-2", AdminAction.DISABLE, NOW)
    token = seal("gw-2")
    blind = answer(token, state)
    assert blind["routes_to"] is None and blind["routes_by"] == "key" and blind["state"] == "disabled"
    keys = [f"10.0.{i}.{j}" for i in range(4) for j in range(5)] if balance is BalanceMethod.SOURCE else [
        f"user{i}" for i in range(20)
    ]
    for key in keys:
        expected = route_for_key(state["hp"], key, NOW)
        assert expected is not None
        assert answer(token, state, key=key)["routes_to"] == expected.id
        decided = decide("gw-2", state["hp"], session=b"s" * 8, now=NOW, balance_key=key)  # as a handshake does
        assert decided.backend.id == expected.id
    assert len({answer(token, state, key=key)["routes_to"] for key in keys}) > 1  # not the session's one answer


def test_in_a_hashed_pool_a_pin_that_holds_needs_no_key() -> None:
    state = hashed_pool(BalanceMethod.HASH)
    result = answer(seal("gw-2"), state)
    assert result["routes_to"] == "gw-2" and "routes_by" not in result
    assert answer(seal("gw-2"), state, key="anyone")["routes_to"] == "gw-2"


def test_without_sticky_every_client_goes_by_its_key() -> None:
    state = hashed_pool(BalanceMethod.HASH, sticky=False)
    assert answer(seal("gw-2"), state)["routes_by"] == "key"
    expected = route_for_key(state["hp"], "user7", NOW)
    assert expected is not None and answer(seal("gw-2"), state, key="user7")["routes_to"] == expected.id


@pytest.mark.parametrize(
    ("balance", "spelt", "plain", "bad", "reason"),
    [
        (BalanceMethod.SOURCE, "::ffff:10.0.0.1", "10.0.0.1", "user7", "IP address"),
        (BalanceMethod.HASH, " user7\t", "user7", "  ", "empty"),
    ],
)
def test_a_key_is_read_as_route_reads_it(balance: BalanceMethod, spelt: str, plain: str, bad: str, reason: str) -> None:
    state = hashed_pool(balance)
    state["hp"].apply_admin("gw-2", AdminAction.DISABLE, NOW)
    assert answer(seal("gw-2"), state, key=spelt)["routes_to"] == answer(seal("gw-2"), state, key=plain)["routes_to"]
    with pytest.raises(BadKey, match=reason):
        answer(seal("gw-2"), state, key=bad)


def test_a_key_changes_nothing_in_a_round_robin_pool() -> None:
    state = pools("gateways")
    state["gateways"].apply_admin("gw-2", AdminAction.DISABLE, NOW)
    assert answer(seal("gw-2"), state, key="user7") == answer(seal("gw-2"), state)


@pytest.mark.parametrize(
    ("fraction", "max_age", "issued_at", "expires_at"),
    [
        (0.0, 3600.0, "2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z"),
        (0.999, 3600.0, "2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z"),
        (0.999, 0.5, "2027-01-15T08:00:00Z", "2027-01-15T08:00:01Z"),
        (0.1, 0.9, "2027-01-15T08:00:00Z", "2027-01-15T08:00:01Z"),
        (0.1, 0.899, "2027-01-15T08:00:00Z", "2027-01-15T08:00:00Z"),
    ],
)
def test_times_are_to_the_second_truncated_from_the_tokens_milliseconds(
    fraction: float, max_age: float, issued_at: str, expires_at: str
) -> None:
    """A token's issue time has milliseconds; /lookup's times keep their format (whole seconds, `Z`): the
    second it was issued in and the second it expires in (exactly max_age later), never a later one."""
    claim = Claim(backend_id="gw-2", issued_at=NOW + fraction, session=b"s" * 8)
    codec = TokenCodec([KEY], max_age)
    token = codec.seal(claim, os.urandom(NONCE_BYTES))
    result = lookup_token(token, codec, pools("gateways"), now=NOW + fraction, max_age=max_age)
    assert (result["issued_at"], result["expires_at"]) == (issued_at, expires_at)
