# lb/http/_scan.c: the fast reading of a well-formed HTTP/1.x head (lb.http.head uses it when built).

def read_head(
    raw: bytes, request: bool, /
) -> tuple[tuple[str, str, str], tuple[tuple[str, str], ...], dict[str, list[str]]] | None: ...
def head_end(buffer: bytes | bytearray, start: int, stop: int, /) -> int: ...  # buffer.find(b"\r\n\r\n", start, stop)
def any_underscored(index: dict[str, list[str]], /) -> bool: ...  # any("_" in name for name in index)
known_lowered: dict[str, str]  # each known header name, as usually spelt and in lower case, to its lower case
