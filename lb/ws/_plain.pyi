# lb/ws/_plain.c: the WebSocket handshake's two heads as browsers and gateways write them (lb.proxy.connection
# uses them when built).

def plain_upgrade(method: str, version: str, index: dict[str, list[str]], /) -> bool: ...
def plain_switch(raw: bytes, key: str, /) -> bool: ...
def accept(key: str, /) -> str | None: ...  # None for anything but an exact str of ASCII
def accept_portable(key: str, /) -> str | None: ...  # accept's answer by the portable SHA-1 (tests hold both)
def sha_extensions() -> bool: ...  # whether accept's SHA-1 runs on this CPU's SHA extensions
