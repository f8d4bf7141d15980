"""`python -m backends_demo`'s command line: what it refuses, as a usage error (one line, exit 2)."""

from __future__ import annotations

import pytest

from backends_demo.__main__ import parse_args


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--id", "gw-1", "--port", "70000"], "--port"),  # was an OverflowError traceback, exit 1
        (["--id", "gw-1", "--port", "-1"], "--port"),
        (["--id", "", "--port", "9001"], "--id"),  # every hello said server_id ""
        (["--id", "gw-1", "--port", "9001", "--close-spread", "-3"], "--close-spread"),  # taken as 0
        (["--id", "gw-1", "--port", "9001", "--close-spread", "inf"], "--close-spread"),  # SIGTERM never closed
        (["--id", "gw-1", "--port", "9001", "--close-spread", "nan"], "--close-spread"),
        (["--id", "gw-1", "--port", "9001", "--app-cookie", "a b"], "--app-cookie"),  # every answer a 500
        (["--id", "gw-1", "--port", "9001", "--app-cookie", ""], "--app-cookie"),
        (["--id", "gw-1", "--port", "9001", "--app-cookie", "sid;x"], "--app-cookie"),
    ],
)
def test_a_bad_argument_is_a_usage_error(argv: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Found black-box: these started a gateway that failed later (a traceback, a 500 on every answer
    for a cookie name that is not an HTTP token, a SIGTERM that never ended) or quietly did otherwise."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {names}" in err or f"error: {names}" in err, err


def test_good_arguments() -> None:
    args = parse_args(["--id", "gw-1", "--port", "0", "--app-cookie", "SESSION_ID", "--close-spread", "2.5"])
    assert (args.server_id, args.port, args.app_cookie, args.close_spread) == ("gw-1", 0, "SESSION_ID", 2.5)
