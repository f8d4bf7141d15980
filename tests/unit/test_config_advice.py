"""lb.config.advice: settings that are valid but defeat their purpose are said, each naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.config.advice import advice
from lb.config.load import parse_config
from lb.config.model import Config
from lb.devcerts import write_dev_certs

KEY = "k" * 43


def config(tmp_path: Path, *, admin: str = "{token: t}", affinity: str = "", tls: bool = False) -> Config:
    listeners = '[{bind: "127.0.0.1:0"}'
    if tls:
        write_dev_certs(tmp_path / "certs", ["localhost"])
        listeners += ', {bind: "127.0.0.1:0", tls: {cert: certs/server.crt, key: certs/server.key}}'
    text = f"""
listeners: {listeners}]
admin: {admin}
affinity: {{secret_keys: [{KEY}]{affinity}}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    return parse_config(text, base_dir=tmp_path, environ={})


def test_a_plain_sensible_configuration_gets_no_advice(tmp_path: Path) -> None:
    assert advice(config(tmp_path)) == []


def test_no_admin_token_says_the_actions_answer_401(tmp_path: Path) -> None:
    (sentence,) = advice(config(tmp_path, admin="{bind: 127.0.0.1:9000}"))
    assert sentence.startswith("admin.token is not set") and "401" in sentence


@pytest.mark.parametrize(
    ("secure", "tls", "expected"),
    [
        ("auto", False, "on listeners[0] (no TLS)"),
        ("auto", True, "on listeners[0] (no TLS)"),
        ("always", False, None),
    ],
)
def test_same_site_none_without_secure_says_browsers_drop_the_cookie(
    tmp_path: Path, secure: str, tls: bool, expected: str | None
) -> None:
    said = advice(config(tmp_path, affinity=f", same_site: None, secure: {secure}", tls=tls))
    if expected is None:
        assert said == []
    else:
        (sentence,) = said
        assert expected in sentence and "drop" in sentence, sentence


def test_same_site_none_on_tls_listeners_only_is_fine(tmp_path: Path) -> None:
    write_dev_certs(tmp_path / "certs", ["localhost"])
    text = f"""
listeners: [{{bind: "127.0.0.1:0", tls: {{cert: certs/server.crt, key: certs/server.key}}}}]
admin: {{token: t}}
affinity: {{secret_keys: [{KEY}], same_site: None}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    assert advice(parse_config(text, base_dir=tmp_path, environ={})) == []


def test_proxy_protocol_with_crc32c_in_python_says_what_it_costs(tmp_path: Path) -> None:
    text = f"""
listeners: [{{bind: "127.0.0.1:0"}}, {{bind: "127.0.0.1:0", proxy_protocol: true}}]
admin: {{token: t}}
affinity: {{secret_keys: [{KEY}]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""
    proxied = parse_config(text, base_dir=tmp_path, environ={})
    assert advice(proxied) == []
    (sentence,) = advice(proxied, crc32c_in_c=False)
    assert sentence.startswith("listeners[1].proxy_protocol: google-crc32c runs its pure-Python fallback")
    assert advice(config(tmp_path), crc32c_in_c=False) == [], "no PROXY listener: the checksum is never computed"
