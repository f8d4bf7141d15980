"""The spy backend: a threaded HTTP server in this process that records every request the balancer
forwards to it and echoes WebSocket frames, so a test can prove that a request never reached a backend,
and read the exact forwarded head.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness import HOST, STOP_WAIT, WS_GUID
from tests.harness.raw import encode_frame


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


class _SpyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SpyServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, json.dumps({"status": "ok", "server_id": self.server.spy.id}).encode())
            return
        self.server.spy.record(SeenRequest(self.command, self.path, list(self.headers.items())))
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade") or "").lower() == "websocket" and key:
            self._websocket(key)
        else:
            self._answer(404, b"spy: no such page\n")

    def do_POST(self) -> None:
        self.server.spy.record(SeenRequest(self.command, self.path, list(self.headers.items())))
        self._answer(404, b"spy: no such page\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _websocket(self, key: str) -> None:
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.server.spy.track(self.connection)
        # Echo every frame back (unmasked), answer ping with pong and close with the same close.
        with contextlib.suppress(OSError, ValueError):
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                fin_op, length = head[0], head[1] & 0x7F
                masked = head[1] & 0x80
                if length == 126:
                    length = struct.unpack("!H", self.rfile.read(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", self.rfile.read(8))[0]
                mask = self.rfile.read(4) if masked else b""
                payload = self.rfile.read(length)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                opcode = fin_op & 0x0F
                if opcode == 0x9:
                    fin_op = 0x80 | 0xA
                self.wfile.write(encode_frame(fin_op & 0x0F, payload, fin=bool(fin_op & 0x80), mask=False))
                self.wfile.flush()
                if opcode == 0x8:
                    return


class _SpyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    spy: SpyBackend


class SpyBackend:
    """A backend in this process that records each forwarded request (health probes excepted)."""

    def __init__(self, server_id: str) -> None:
        self.id = server_id
        self._server = _SpyServer((HOST, 0), _SpyHandler)
        self._server.spy = self
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._requests: list[SeenRequest] = []
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"spy {server_id}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        self._server.shutdown()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=STOP_WAIT)
