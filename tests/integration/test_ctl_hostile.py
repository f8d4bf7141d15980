"""`lb ctl` against admin URLs that are not (or no longer) a well-behaved admin API.

Each case runs the real command (`python -m lb ctl`) against a scripted HTTP server on loopback:
a redirect must not carry the bearer token elsewhere; HTML or a hang or a dripping answer is a
clear one-line error within the timeout; escape sequences in an answer never reach the terminal.
Every server loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import unicodedata
from collections.abc import Callable, Iterator

import pytest

from tests.harness import UNIT
from tests.harness.processes import run_ctl
from tests.harness.tcp import ThreadedServer

MAX_SECONDS = 15.0
Script = Callable[["Scripted", socket.socket, bytes], None]


class Scripted:
    """Answers every connection with `script(server, conn, request_head)`; remembers the request heads."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.server = ThreadedServer(self._serve, name="admin")
        self.stop = self.server.stop
        self.url = self.server.url

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            self.heads.append(head)
            self._read_body(conn, head)
            self.script(self, conn, head)

    @staticmethod
    def _read_body(conn: socket.socket, head: bytes) -> None:
        """Read what the request's Content-Length says before answering: closing with a POST body unread
        sends an RST, which can reach the client before the answer it should read (a flaky `enable`)."""
        lines = head.split(b"\r\n\r\n", 1)
        fields = lines[0].split(b"\r\n")[1:]
        length = next((int(v) for n, _, v in (f.partition(b":") for f in fields)
                       if n.strip().lower() == b"content-length" and v.strip().isdigit()), 0)
        seen = len(lines[1]) if len(lines) > 1 else 0
        while seen < min(length, 65536):
            data = conn.recv(4096)
            if not data:
                return
            seen += len(data)

    def close(self) -> None:
        self.server.close()


@contextlib.contextmanager
def scripted(script: Script) -> Iterator[Scripted]:
    server = Scripted(script)
    try:
        yield server
    finally:
        server.close()


def answer(status: str, body: bytes, content_type: str = "application/json", extra: str = "") -> Script:
    def run(server: Scripted, conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n".encode() + body
        )

    return run


def hang(server: Scripted, conn: socket.socket, head: bytes) -> None:
    server.stop.wait(MAX_SECONDS)


def drip(server: Scripted, conn: socket.socket, head: bytes) -> None:
    """Headers, then a 1000-byte body one byte every 200 ms: each read is quick, the whole never ends."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline and not server.stop.wait(0.2):
        conn.sendall(b" ")


def trickle(server: Scripted, conn: socket.socket, data: bytes, pause: float) -> None:
    """`data` a byte every `pause` seconds, until the server closes: each read is quick, the whole never ends."""
    deadline = time.monotonic() + MAX_SECONDS
    for byte in data:
        if time.monotonic() > deadline or not server.server.pause(pause):
            return
        conn.sendall(bytes([byte]))


def slow_status_line(server: Scripted, conn: socket.socket, head: bytes) -> None:
    trickle(server, conn, b"HTTP/1.1 200 OK" + b"K" * 1000, 0.2)


def slow_headers(server: Scripted, conn: socket.socket, head: bytes) -> None:
    trickle(server, conn, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000, 0.2)


def slow_chunk_size(server: Scripted, conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    trickle(server, conn, b"0" * 1000, 0.2)


def endless_continue(server: Scripted, conn: socket.socket, head: bytes) -> None:
    """An interim `100 Continue` every 200 ms: http.client skips each and reads the next status line."""
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline and server.server.pause(0.2):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


def ctl(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = run_ctl(*args, env=env)
    return done, time.monotonic() - started


def test_a_redirect_is_not_followed_and_never_carries_the_token() -> None:
    """`lb ctl` does not follow an admin redirect (exit 1 saying so): the bearer token never goes elsewhere."""
    with scripted(answer("200 OK", b"{}")) as elsewhere:
        to = f"Location: {elsewhere.url}/status\r\n"
        with scripted(answer("302 Found", b"", extra=to)) as admin:
            done, _ = ctl("--admin", admin.url, "--token", "s3cret-token", "status")
    assert done.returncode == 1, done
    assert "302" in done.stderr and "redirect" in done.stderr.lower()
    assert elsewhere.heads == [], "the redirect was followed"


def test_an_http_proxy_in_the_environment_is_not_used() -> None:
    """A proxy would carry the bearer token elsewhere, as a followed redirect would: the admin API is
    reached directly, whatever http_proxy says."""
    with scripted(answer("200 OK", b"{}")) as proxy, scripted(answer("200 OK", b'{"pools": {}}')) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "s3cret-token", "status",
                      env={"http_proxy": proxy.url, "HTTP_PROXY": proxy.url, "no_proxy": ""})
    assert proxy.heads == [], "the request went through the proxy"
    assert len(admin.heads) == 1, done


def test_each_address_of_the_admin_name_gets_only_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket.create_connection gave each address of a name the whole timeout: three addresses whose SYNs
    go unanswered took three times --timeout."""
    from lb.ctl import CtlError, Target, call

    with socket.socket() as full:  # a listen queue of one, filled: further SYNs are dropped
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        address = full.getsockname()
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:  # without waiting: the last ones stay unanswered
            filler.setblocking(False)
            filler.connect_ex(address)
        resolved = socket.getaddrinfo(*address, 0, socket.SOCK_STREAM)
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: resolved * 3)
        started = time.monotonic()
        try:
            with pytest.raises(CtlError, match="within 1s"):
                call(Target(url=f"http://admin.test:{address[1]}", token=None, timeout=1.0), "GET", "/status")
        finally:
            for filler in fillers:
                filler.close()
    assert time.monotonic() - started < 2.0


def test_a_name_that_does_not_resolve_in_time_ends_the_call_at_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog has no socket to shut down while the admin host's name resolves: a resolver that does
    not answer held `lb ctl` for its own timeouts, past --timeout."""
    from lb.ctl import CtlError, Target, call

    def silent_resolver(*args: object, **kwargs: object) -> list[object]:
        time.sleep(5)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", silent_resolver)
    started = time.monotonic()
    with pytest.raises(CtlError, match="within 1s"):
        call(Target(url="http://admin.test:9", token=None, timeout=1.0), "GET", "/status")
    assert time.monotonic() - started < 2.0


def raw(reply: bytes) -> Script:
    def run(server: Scripted, conn: socket.socket, head: bytes) -> None:
        conn.sendall(reply)

    return run


@pytest.mark.parametrize("reply", [
    pytest.param(b"garbage\r\n\r\n", id="not a status line"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", id="body cut short"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad chunk"),
    pytest.param(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100\r\n\r\n{", id="error body cut short"),
    pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000,
                 id="JSON nested too deeply"),
    pytest.param(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000,
                 id="error body nested too deeply"),
    pytest.param(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"pools": {}, "tunnels": NaN}', id="NaN"),
])
def test_an_answer_that_is_not_http_is_one_line_and_exit_1(reply: bytes) -> None:
    """Something else on the admin port: one line saying so, never a Python traceback."""
    with scripted(raw(reply)) as admin:
        done, _ = ctl("--admin", admin.url, "status")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


STATUS_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("command", "reply", "said"),
    [
        pytest.param(["status"], STATUS_HEAD + b'Content-Length: 4000\r\n\r\n{"pools": {}}', "13 of the 4000 bytes",
                     id="status"),
        pytest.param(["status", "--json"], STATUS_HEAD + b'Content-Length: 4000\r\n\r\n{"pools": {}}',
                     "13 of the 4000 bytes", id="status --json"),
        pytest.param(["enable", "p", "b"], STATUS_HEAD + b"Content-Length: 4000\r\n\r\n"
                     + json.dumps({"pool": "p", "id": "b", "state": "up"}).encode(), "of the 4000 bytes", id="enable"),
        pytest.param(["status"], STATUS_HEAD + b'Transfer-Encoding: chunked\r\n\r\nd\r\n{"pools": {}}\r\n',
                     "chunked body", id="chunked, no last chunk"),
    ],
)
def test_an_answer_cut_short_of_its_length_is_exit_1(command: list[str], reply: bytes, said: str) -> None:
    """README: exit 1 when the admin API "does not answer in full".  JSON that parses is not the whole answer
    when the connection ends before its Content-Length: an empty /status was drawn, and exited 0."""
    with scripted(raw(reply)) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "t", *command)
    assert done.returncode == 1 and "cut short" in done.stderr and said in done.stderr, done
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done


@pytest.mark.parametrize(("configured", "hint"), [
    (False, "set admin.token in the balancer's config"),
    (True, "give the admin token with --token"),
])
def test_a_401_s_hint_follows_its_reason(configured: bool, hint: str) -> None:
    """With no token configured, asking the operator for one sent them looking for a token that does not exist."""
    from lb.control.admin import NO_TOKEN_CONFIGURED, WRONG_TOKEN

    reason = WRONG_TOKEN if configured else NO_TOKEN_CONFIGURED
    body = json.dumps({"error": reason, "request_id": "r"}).encode()
    reply = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    with scripted(raw(reply + body)) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "t" * 20, "enable", "p", "b")
    assert done.returncode == 1 and reason in done.stderr and hint in done.stderr, done.stderr


def test_an_html_error_page_is_one_readable_line() -> None:
    """`lb ctl` against an HTML error page (a proxy's 502) exits 1 with one line naming the status, no markup or escape
    sequence."""
    page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad \x1b[31mGateway</h1></body></html>"
    with scripted(answer("502 Bad Gateway", page, "text/html")) as admin:
        done, _ = ctl("--admin", admin.url, "status")
    assert done.returncode == 1, done
    assert "502" in done.stderr and "<html" not in done.stderr and "\x1b" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_html_page_with_200_is_not_taken_for_an_answer() -> None:
    """`lb ctl`: a 200 that is not JSON (a captive or proxy page) is exit 1, "not JSON", never taken as the API's
    answer."""
    with scripted(answer("200 OK", b"<html>welcome</html>", "text/html")) as admin:
        done, _ = ctl("--admin", admin.url, "status")
    assert done.returncode == 1 and "not JSON" in done.stderr, done


@pytest.mark.parametrize(
    "script",
    [hang, drip, slow_status_line, slow_headers, slow_chunk_size, endless_continue],
    ids=["hang", "drip", "slow status line", "slow headers", "slow chunk size", "endless 100 Continue"],
)
def test_a_server_that_hangs_or_drips_is_given_up_on_within_the_timeout(script: Script) -> None:
    """--timeout bounds the whole call, the answer's head included, not each read."""
    with scripted(script) as admin:
        done, took = ctl("--admin", admin.url, "--timeout", "1", "status")
    assert done.returncode == 1, done
    assert "within 1s" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert took < 5 * UNIT, took


def test_a_tls_handshake_that_drips_is_given_up_on_within_the_timeout() -> None:
    """An https admin URL whose server answers the ClientHello a byte at a time: the handshake is bounded too.

    (The ssl module bounds a handshake as a whole by the socket's timeout; this keeps it so now that the
    socket is shut down at the deadline instead.)"""
    server: ThreadedServer

    def handshake_drip(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2.0)
            conn.recv(65536)  # the ClientHello
            record = b"\x16\x03\x03\x40\x00" + b"\x02" * 1000  # a 16 KiB handshake record that never ends
            deadline = time.monotonic() + MAX_SECONDS
            for byte in record:
                if time.monotonic() > deadline or not server.pause(0.2):
                    return
                conn.sendall(bytes([byte]))

    server = ThreadedServer(handshake_drip, name="tls drip")
    try:
        done, took = ctl("--admin", f"https://{server.address}", "--timeout", "1", "status")
    finally:
        server.close()
    assert done.returncode == 1, done
    assert "within 1s" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert took < 5 * UNIT, took


def test_escape_sequences_in_an_answer_never_reach_the_terminal() -> None:
    """`lb ctl`: control and invisible characters in the admin API's answer or error never reach the terminal."""
    document = {
        "pools": {"p\x1b[2J": {"backends": [
            {"id": "gw\x1b]0;owned\x07", "address": "127.0.0.1:1", "state": "up\r", "reason": "\x1b[1Ahidden"},
            # Invisible ones too: zero-width, bidi marks and isolates, a BOM, Arabic letter mark.
            {"id": "gw\u200b2", "address": "127.0.0.1:2", "state": "up", "reason": "\u200e\u2066x\u2069\ufeff\u061c"},
        ]}},
        "tunnels": 0, "role": "single",
    }
    with scripted(answer("200 OK", json.dumps(document).encode())) as admin:
        done, _ = ctl("--admin", admin.url, "status")
    assert done.returncode == 0, done
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
    assert not any(unicodedata.category(character) in ("Cc", "Cf") for character in done.stdout.replace("\n", ""))
    assert "gw" in done.stdout and "hidden" in done.stdout
    message = json.dumps({"error": "no \x1b[2Jway"}).encode()
    with scripted(answer("400 Bad Request", message)) as admin:
        done, _ = ctl("--admin", admin.url, "enable", "p", "b")
    assert done.returncode == 1 and "\x1b" not in done.stderr and "way" in done.stderr


@pytest.mark.parametrize(
    "document",
    [{"pools": {"p": "x"}}, {"pools": {"p": {"backends": [1, None]}}}, {"pools": {"p": {"backends": "x"}}}, [1]],
    ids=["pool not an object", "backends not objects", "backends not a list", "not an object"],
)
def test_a_status_of_the_wrong_shape_is_an_error_not_a_traceback(document: object) -> None:
    """`lb ctl status`: a /status document of the wrong shape is exit 1 "unexpected answer", never a traceback."""
    with scripted(answer("200 OK", json.dumps(document).encode())) as admin:
        done, _ = ctl("--admin", admin.url, "status")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    assert "unexpected answer" in done.stderr


ACTION = {"pool": "p", "id": "b", "state": "draining"}  # the admin API's answer to an action on p/b
LOOKUP = {"valid": True, "pool": "p", "backend": "b", "state": "down", "routes_to": None,
          "issued_at": "2026-11-30T16:20:41Z", "expires_at": "2026-11-30T17:20:41Z"}


@pytest.mark.parametrize(
    ("command", "document"),
    [
        pytest.param(["drain", "p", "b"], {"message": "accepted"}, id="drain: another service's object"),
        pytest.param(["disable", "p", "b"], {"pool": "p", "id": "c", "state": "disabled"}, id="another backend"),
        pytest.param(["enable", "p", "b"], [1, 2, 3], id="enable: a list"),
        pytest.param(["drain", "p", "b", "--json"], {"message": "accepted"}, id="drain --json"),
        pytest.param(["drain", "p", "b", "--rate", "5"], {**ACTION, "close_after": 0, "rate": "5"},
                     id="rate not a number"),
        pytest.param(["lookup", "T"], [1, 2, 3], id="lookup: a list"),
        pytest.param(["lookup", "T"], {"message": "accepted"}, id="lookup: no valid"),
        pytest.param(["lookup", "T"], {"valid": True}, id="lookup: valid, no backend"),
        pytest.param(["lookup", "T"], {**LOOKUP, "routes_to": 7}, id="lookup: routes_to not a string"),
        pytest.param(["lookup", "T"], {"valid": False}, id="lookup: not valid, no reason"),
        pytest.param(["status", "--json"], {"message": "accepted"}, id="status --json: no pools"),
        pytest.param(["status", "--json"], {"pools": {"p": {"backends": [1]}}}, id="status --json: backends"),
    ],
)
def test_a_2xx_json_answer_that_is_not_the_admin_apis_is_exit_1(command: list[str], document: object) -> None:
    """README: exit 1 when the server "answers something that is not the admin API's JSON, with the reason".
    A deploy script's `lb ctl drain` was told a drain happened by any 200 JSON object (printing `p/b: ?`)."""
    with scripted(answer("200 OK", json.dumps(document).encode())) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "t", *command)
    assert done.returncode == 1 and "unexpected answer (" in done.stderr, done
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done


@pytest.mark.parametrize(
    ("command", "document", "printed"),
    [
        pytest.param(["drain", "p", "b", "--rate", "5"], {**ACTION, "close_after": 0.0, "rate": 5.0},
                     "p/b: draining (tunnels close after 0s at 5/s)", id="drain"),
        pytest.param(["drain", "p", "b", "--rate", "5"],
                     {**ACTION, "state": "disabled", "removed": True, "close_after": 0.0, "rate": 5.0},
                     "p/b: disabled, removed (tunnels close after 0s at 5/s)", id="drain a removed backend"),
        pytest.param(["enable", "p", "b", "--json"], {**ACTION, "state": "up"}, '"state": "up"', id="enable --json"),
        pytest.param(["lookup", "T"], LOOKUP, '"routes_to": null', id="lookup: valid"),
        pytest.param(["lookup", "T"], {**LOOKUP, "routes_to": None, "routes_by": "key"}, '"routes_by": "key"',
                     id="lookup: routed by key"),
        pytest.param(["lookup", "T"], {"valid": False, "reason": "expired"}, '"reason": "expired"',
                     id="lookup: not valid"),
        pytest.param(["status", "--json"], {"pools": {"p": {"backends": [{"id": "b"}]}}}, '"id": "b"',
                     id="status --json"),
    ],
)
def test_the_admin_apis_own_answers_are_exit_0(command: list[str], document: object, printed: str) -> None:
    """SPEC `lb ctl`: every answer the admin API gives on success prints and exits 0."""
    with scripted(answer("200 OK", json.dumps(document).encode())) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "t", *command)
    assert done.returncode == 0 and printed in done.stdout, done


def test_a_refused_lookup_of_a_huge_token_is_one_short_line_without_the_token() -> None:
    """The error line names the request without its query: the token only as its digest, as the logs do."""
    token = "A" * 30_000
    with scripted(answer("400 Bad Request", json.dumps({"error": "bad token"}).encode())) as admin:
        done, _ = ctl("--admin", admin.url, "--token", "t", "lookup", token)
    assert done.returncode == 1, done
    assert "AAAAAAAAAA" not in done.stderr and len(done.stderr) < 300, done.stderr
    assert "HTTP 400: bad token" in done.stderr


def test_ctrl_c_while_waiting_ends_ctl_by_sigint_without_a_traceback() -> None:
    """As a C tool ends on Ctrl-C: by SIGINT itself (a shell loop around `lb ctl` stops; an exit of 130
    told it the child had handled the signal, and the loop went on), and no traceback."""
    import signal
    import sys

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        ctl = subprocess.Popen(
            [sys.executable, "-m", "lb", "ctl", "--admin", f"http://127.0.0.1:{port}", "--timeout", "60", "status"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            silent.settimeout(10 * UNIT)
            conn, _ = silent.accept()  # it is waiting for the answer now
            with conn:
                conn.recv(65536)
                ctl.send_signal(signal.SIGINT)
                _, err = ctl.communicate(timeout=10 * UNIT)
        finally:
            if ctl.poll() is None:
                ctl.kill()
                ctl.wait()
    assert ctl.returncode == -signal.SIGINT, (ctl.returncode, err)
    assert err == ""
