"""Where a relayed HTTP response body ends (RFC 9112 §6.3), without copying it.  [pure]

Used for answers that are not a 101: the balancer must know when the
backend's answer is complete so it can close the client connection promptly,
even when the backend keeps its own side alive.
"""

from __future__ import annotations

import re

from lb.http.head import RequestHead, ResponseHead

_SIZE, _SIZE_LF, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _TRAILER_LF, _DONE, _SIZE_BWS = range(9)

# Chunk extensions and trailers are read byte by byte and never relayed as data: bounded so a
# peer cannot make them endless (llhttp caps extensions likewise, CVE-2024-22019).
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
MAX_TRAILERS = 65536  # the whole trailer section
# 15 hex digits stay below 2**60: no 64-bit parser behind us can wrap a size we accepted.
MAX_SIZE_DIGITS = 15
# A whole chunk-size line as the byte loop below accepts it (size, optional whitespace, optional
# extensions, CRLF), read in one C-speed match instead of a loop pass per byte: a line of 4 KiB of
# extensions cost 0.5 ms, a peer's CPU for nothing.  Lines it does not match (split across reads,
# too long, or malformed) go through the byte loop, which has the last word on them.
_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]{0,%d}|[ \t]*)\r\n" % (MAX_SIZE_DIGITS, MAX_CHUNK_LINE)
)
_size_line = _SIZE_LINE.match


class BodyFramer:
    """Tracks one response body; `feed` says where in a chunk the body ends."""

    __slots__ = (
        "_chunked", "_colon", "_extension", "_line_len", "_remaining", "_state", "_trailer_len", "_until_eof",
    )

    def __init__(self, *, length: int | None, chunked: bool) -> None:
        self._chunked = chunked
        self._until_eof = length is None and not chunked
        self._remaining = length or 0
        self._state = _SIZE if chunked else (_DONE if length == 0 else _DATA)
        self._extension = False  # in a chunk-size line's extensions, which are skipped up to CR
        self._colon = False  # the current trailer line has its `:`
        self._line_len = 0
        self._trailer_len = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def until_eof(self) -> bool:
        """The body ends when the sender closes: its connection cannot carry another message."""
        return self._until_eof

    def feed(self, data: bytes) -> int | None:
        """Consume `data`; return how many of its bytes complete the body, or None if it goes on.

        Raises:
            ValueError: malformed chunked encoding.
        """
        if self._state == _DONE:
            return 0
        if self._until_eof:
            return None
        if not self._chunked:
            # Content-Length body: no per-byte work at all.
            if len(data) < self._remaining:
                self._remaining -= len(data)
                return None
            used = self._remaining
            self._remaining = 0
            self._state = _DONE
            return used
        return self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> int | None:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if not self._remaining:
                    if data.startswith(b"\r\n", i):  # the usual CRLF after the data, in one step
                        i += 2
                        self._state = _SIZE
                    else:
                        self._state = _DATA_CR
                continue
            if state == _SIZE and not self._line_len and not self._extension:
                line = _size_line(data, i)
                if line is not None and line.end() - i <= MAX_CHUNK_LINE:
                    i = line.end()
                    self._remaining = int(line.group(1), 16)
                    self._state = _DATA if self._remaining else _TRAILER
                    continue
            byte = data[i]
            i += 1
            if state == _SIZE:
                if byte == 0x0D:
                    self._state = _SIZE_LF
                elif self._extension:
                    # A bare LF or NUL here is a line end or junk to some parsers: refused so the
                    # backend cannot read the body's end where we do not (request smuggling).
                    if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
                        raise ValueError("control byte in chunk extension")
                    self._line_len += 1
                    if self._line_len > MAX_CHUNK_LINE:
                        raise ValueError("chunk size line too long")
                elif chr(byte) in "0123456789abcdefABCDEF" and self._line_len < MAX_SIZE_DIGITS:
                    self._remaining = self._remaining * 16 + int(chr(byte), 16)
                    self._line_len += 1
                elif byte == 0x3B and self._line_len:
                    self._extension = True
                elif byte in (0x20, 0x09) and self._line_len:
                    self._state = _SIZE_BWS
                else:
                    raise ValueError("malformed chunk size")
            elif state == _SIZE_BWS:
                # RFC 9112 §7.1.1: whitespace after the size may only lead to `;` (or end the line);
                # `5 junk` is a size some parsers read otherwise.
                if byte == 0x3B:
                    self._extension = True
                    self._state = _SIZE
                elif byte == 0x0D:
                    self._state = _SIZE_LF
                elif byte not in (0x20, 0x09):
                    raise ValueError("malformed chunk size")
                else:
                    self._line_len += 1
                    if self._line_len > MAX_CHUNK_LINE:
                        raise ValueError("chunk size line too long")
            elif state == _SIZE_LF:
                if byte != 0x0A or not self._line_len:
                    raise ValueError("malformed chunk size line")
                self._extension, self._line_len = False, 0
                self._state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_CR:
                if byte != 0x0D:
                    raise ValueError("missing CRLF after chunk")
                self._state = _DATA_LF
            elif state == _DATA_LF:
                if byte != 0x0A:
                    raise ValueError("missing CRLF after chunk")
                self._state = _SIZE
            elif state == _TRAILER:
                if byte == 0x0D:
                    if self._line_len and not self._colon:
                        raise ValueError("trailer line without a colon")
                    self._state = _TRAILER_LF
                elif (byte < 0x20 and byte != 0x09) or byte == 0x7F:
                    raise ValueError("control byte in trailer")  # a bare LF included, as above
                elif not self._line_len and byte in (0x20, 0x09):
                    raise ValueError("trailer line folded (obs-fold)")
                else:
                    if byte == 0x3A:
                        self._colon = True
                    self._line_len += 1
                    self._trailer_len += 1
                    if self._trailer_len > MAX_TRAILERS:
                        raise ValueError("trailers too large")
            elif state == _TRAILER_LF:
                if byte != 0x0A:
                    raise ValueError("malformed trailer")
                if self._line_len == 0:
                    self._state = _DONE
                    return i
                self._line_len = 0
                self._colon = False
                self._state = _TRAILER
        return None


def response_framer(response: ResponseHead, *, request_method: str) -> BodyFramer:
    """How the body of `response` is delimited (RFC 9112 §6.3, rules 1-3, 5-7)."""
    status = response.status
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return BodyFramer(length=0, chunked=False)
    if response.head.get_all("transfer-encoding"):
        return BodyFramer(length=None, chunked=True)
    length = response.head.get("content-length")
    if length is not None:
        return BodyFramer(length=int(length.split(",")[0]), chunked=False)
    return BodyFramer(length=None, chunked=False)


def request_framer(request: RequestHead) -> BodyFramer:
    """How the body of `request` is delimited (RFC 9112 §6.3, rules 4-6): chunked, a length, or none.

    A request never runs until the connection closes: without framing headers its body is empty,
    and what follows the head is the next request.
    """
    if request.head.get_all("transfer-encoding"):
        return BodyFramer(length=None, chunked=True)
    length = request.head.get("content-length")
    if length is not None:
        return BodyFramer(length=int(length.split(",")[0]), chunked=False)
    return BodyFramer(length=0, chunked=False)
