"""Where a relayed HTTP message body ends (RFC 9112 §6.3, §7.1), without copying it.  [pure]

A request's body: only its bytes go to the backend, and what follows is the next request.
An answer's (not a 101): the balancer must know when it is complete so it can close the
client connection promptly, even when the backend keeps its own side alive.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Final

from lb.http.forwarding import HOP_BY_HOP
from lb.http.head import PROTECTED_HEADERS, TCHAR, RequestHead, ResponseHead

# The chunked body's states, each Final: compiled code reads a constant, where a name unpacked from
# range() is looked up in the module's dict at every use.
_SIZE: Final = 0
_SIZE_LF: Final = 1
_SIZE_BWS: Final = 2
_DATA: Final = 3
_DATA_CR: Final = 4
_DATA_LF: Final = 5
_TRAILER_NAME: Final = 6
_TRAILER_VALUE: Final = 7
_TRAILER_LF: Final = 8
_TRAILERS_LF: Final = 9
_DONE: Final = 10

# Chunk extensions and trailers are never relayed as data: bounded so a peer cannot make them
# endless (llhttp caps extensions likewise, CVE-2024-22019).
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included, without its CRLF
MAX_TRAILERS = 65536  # the whole trailer section
# 15 hex digits stay below 2**60: no 64-bit parser behind us can wrap a size we accepted.
MAX_SIZE_DIGITS = 15
# The bytes an extension or a field value may hold (RFC 9112 §7.1.1, RFC 9110 §5.5): no control
# byte but HTAB.  A bare CR, LF or NUL is a line end or junk to some parsers: refused, so a
# backend cannot read a line's end where we do not (request smuggling).
_LINE_CHARS = rb"[\t\x20-\x7e\x80-\xff]"
_TCHAR = TCHAR.encode("ascii")
# RFC 9112 §7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), a name
# a token, a value a token or a quoted-string (RFC 9110 §5.6.4: no CR, LF or NUL inside).  Checked
# whole, not skipped: a parser behind us that reads an unclosed quote (`5;a="`) past the line's end,
# or a name-less `;` otherwise, would end the line (and so the chunk) where we do not.  Blanks
# before the CRLF are let through, as llhttp can be told to: servers send `5 \r\n` (old Tomcat,
# embedded ones), and a blank can neither end a line nor open a quote.  Possessive throughout, so
# a line of blanks cannot make a match backtrack; a repeated group by an atomic group, never `*+`
# (lb.http.head says why: Python before 3.11.5 matched `5;` here).
_QUOTED = rb'"(?>(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"'
_EXTENSIONS = rb"(?>(?:[ \t]*+;[ \t]*+%s++(?>(?:[ \t]*+=[ \t]*+(?:%s++|%s))?))*)" % (_TCHAR, _TCHAR, _QUOTED)
# A whole chunk-size line (size, extensions, CRLF), read in one C-speed match instead of a loop
# pass per byte.  Lines it does not match (split across reads, too long, or malformed) go through
# the loop below, which has the last word on them.
_size_line = re.compile(rb"([0-9A-Fa-f]{1,%d})%s[ \t]*+\r\n" % (MAX_SIZE_DIGITS, _EXTENSIONS)).match
# The loop's check of a size line it read in pieces, once the line's CR arrives (the pieces it
# passed on before hold no control byte, so no parser could end the line among them).
_size_line_text = re.compile(rb"[0-9A-Fa-f]{1,%d}%s[ \t]*+" % (MAX_SIZE_DIGITS, _EXTENSIONS)).fullmatch
# Runs the loop takes in one C-speed step: a split line costs a loop pass per read, not per byte.
_line_run = re.compile(_LINE_CHARS + rb"*+").match
_blank_run = re.compile(rb"[ \t]*+").match
_name_run = re.compile(_TCHAR + rb"*+").match
# Whole trailer lines as the head reads field lines (RFC 9112 §5: a token, `:`, then field-value
# bytes; no whitespace before the colon, no obs-fold).
_trailer_lines = re.compile(rb"(?>(?:" + _TCHAR + rb"++:" + _LINE_CHARS + rb"*+\r\n)*)").match


class BodyFramer:
    """Tracks one message body; `feed` says where in a read the body ends.

    A chunked body is checked as it passes: a malformed size line, extension or trailer line
    raises at its first bad byte, or (an extension's grammar) at the CR that ends its line, so no
    bad line ever reaches the other side whole.
    """

    __slots__ = (
        "_chunked", "_extension", "_line", "_name", "_refused", "_remaining", "_state", "_trailer_len",
        "_until_eof",
    )

    def __init__(self, *, length: int | None, chunked: bool, forbidden_trailers: frozenset[str] = frozenset()) -> None:
        """Args:
        length: the Content-Length, or None.
        chunked: Transfer-Encoding ends in chunked (it wins over `length`).
        forbidden_trailers: lower-case names refused as trailer fields, together with every
            hop-by-hop name and X-Forwarded-*, also spelt with `_` for `-`: a backend that merges
            trailers into the head would read them as ours.  Empty: any field name passes.
        """
        self._chunked = chunked
        self._until_eof = length is None and not chunked
        self._remaining = length or 0
        self._state = _SIZE if chunked else (_DONE if length == 0 else _DATA)
        self._extension = False  # in a chunk-size line's extensions, which are checked at its CR
        self._line = bytearray()  # a chunk-size line read in pieces, so far (without its CRLF)
        self._trailer_len = 0
        self._name = bytearray()  # a trailer field name split across reads
        self._refused = _refused_trailers(forbidden_trailers) if forbidden_trailers else None

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
            ValueError: malformed chunked encoding, or a forbidden trailer field.
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
            if state == _SIZE:
                if not self._line and not self._extension:
                    # Bounded (`endpos`): a read of hostile extensions is not scanned past a line's limit.
                    line = _size_line(data, i, i + MAX_CHUNK_LINE + 2)
                    if line is not None:
                        i = line.end()
                        self._remaining = int(line.group(1), 16)
                        self._state = _DATA if self._remaining else _TRAILER_NAME
                        continue
                elif self._extension:
                    i = self._take_line(data, i, _run_end(_line_run, data, i))
                    if i == n:
                        break
            elif state == _SIZE_BWS:
                i = self._take_line(data, i, _run_end(_blank_run, data, i))
                if i == n:
                    break
            elif state == _TRAILER_NAME:
                if not self._name:
                    # Whole lines in one match; the loop reads only a line split across reads.
                    end = _run_end(_trailer_lines, data, i)
                    if end > i:
                        self._count_trailers(end - i)
                        if self._refused is not None:
                            self._check_names(data[i:end])
                        i = end
                        continue
                end = _run_end(_name_run, data, i)
                self._count_trailers(end - i)
                self._name += data[i:end]
                i = end
                if i == n:
                    break
            elif state == _TRAILER_VALUE:
                end = _run_end(_line_run, data, i)
                self._count_trailers(end - i)
                i = end
                if i == n:
                    break
            byte = data[i]
            i += 1
            if state == _SIZE:
                if byte == 0x0D and self._line:  # a size line starts with a digit
                    if self._extension and _size_line_text(self._line) is None:
                        raise ValueError("malformed chunk extension")
                    self._state = _SIZE_LF
                elif self._extension:
                    raise ValueError("control byte in chunk extension")  # what _line_run stopped at
                elif chr(byte) in "0123456789abcdefABCDEF" and len(self._line) < MAX_SIZE_DIGITS:
                    self._remaining = self._remaining * 16 + int(chr(byte), 16)
                    self._line.append(byte)
                elif byte == 0x3B and self._line:
                    self._extension = True
                    self._line.append(byte)
                elif byte in (0x20, 0x09) and self._line:
                    self._state = _SIZE_BWS
                    self._line.append(byte)
                else:
                    raise ValueError("malformed chunk size")
            elif state == _SIZE_BWS:
                # RFC 9112 §7.1.1: whitespace after the size may only lead to `;` (or, let through,
                # the line's end); `5 junk` is a size some parsers read otherwise.
                if byte == 0x3B:
                    self._extension = True
                    self._state = _SIZE
                    self._line.append(byte)
                elif byte == 0x0D:
                    self._state = _SIZE_LF
                else:
                    raise ValueError("malformed chunk size")
            elif state == _SIZE_LF:
                if byte != 0x0A or not self._line:
                    raise ValueError("malformed chunk size line")
                self._extension = False
                self._line.clear()
                self._state = _DATA if self._remaining else _TRAILER_NAME
            elif state == _DATA_CR:
                if byte != 0x0D:
                    raise ValueError("missing CRLF after chunk")
                self._state = _DATA_LF
            elif state == _DATA_LF:
                if byte != 0x0A:
                    raise ValueError("missing CRLF after chunk")
                self._state = _SIZE
            else:
                self._count_trailers(1)  # the colon, CR and LF count as they do in a whole-line match
                if state == _TRAILER_NAME:
                    self._end_trailer_name(byte)
                elif state == _TRAILER_VALUE:
                    if byte != 0x0D:
                        raise ValueError("control byte in trailer")  # what _line_run stopped at
                    self._state = _TRAILER_LF
                elif byte != 0x0A:
                    raise ValueError("CR without LF in trailers")
                elif state == _TRAILER_LF:
                    self._state = _TRAILER_NAME
                else:  # _TRAILERS_LF: the blank line's LF ends the body
                    self._state = _DONE
                    return i
        return None

    def _end_trailer_name(self, byte: int) -> None:
        """The byte after a trailer line's name: its colon, or the CR of the section's blank line."""
        if byte == 0x3A and self._name:
            if self._refused is not None:
                self._check_names(self._name + b":")
            self._name.clear()
            self._state = _TRAILER_VALUE
        elif byte == 0x0D and not self._name:
            self._state = _TRAILERS_LF
        elif byte in (0x20, 0x09):
            # Before a colon, or at a line's start (obs-fold): RFC 9112 §5.1, §5.2.
            raise ValueError("whitespace in trailer field name")
        else:
            raise ValueError("malformed trailer line")

    def _take_line(self, data: bytes, start: int, end: int) -> int:
        """Keep a run of a chunk-size line (bounded by MAX_CHUNK_LINE); return where it ends."""
        if len(self._line) + end - start > MAX_CHUNK_LINE:
            raise ValueError("chunk size line too long")
        self._line += data[start:end]
        return end

    def _count_trailers(self, size: int) -> None:
        self._trailer_len += size
        if self._trailer_len > MAX_TRAILERS:
            raise ValueError("trailers too large")

    def _check_names(self, lines: bytes | bytearray) -> None:
        """Refuse whole trailer lines (or a name and its colon) if one is named as `_refused` says."""
        assert self._refused is not None
        refused = self._refused.search(lines)
        if refused is not None:
            raise ValueError(f"trailer field {refused.group(1).decode('ascii')} is not allowed")


@functools.lru_cache(maxsize=8)
def _refused_trailers(names: frozenset[str]) -> re.Pattern[bytes]:
    """A trailer line (at a line start) named as in `names`, hop-by-hop or X-Forwarded-*, `_` for `-`.

    One C search over a read's whole trailer lines, compiled once per set of names.  The names
    are grouped by first letter: a line that starts otherwise fails one test, not one per name
    (twice as fast over a section of short lines).
    """
    spelt: dict[str, list[bytes]] = {"x": [rb"[-_]forwarded[-_]" + _TCHAR + rb"*+"]}
    for name in sorted(names | HOP_BY_HOP | {"trailer"}):
        spelt.setdefault(name[0], []).append(re.escape(name[1:].encode("ascii")).replace(rb"\-", rb"[-_]"))
    groups = [re.escape(first.encode("ascii")) + rb"(?:" + b"|".join(rests) + rb")" for first, rests in spelt.items()]
    return re.compile(rb"(?im)^(" + b"|".join(groups) + rb"):")


def _run_end(run: Callable[[bytes, int], re.Match[bytes] | None], data: bytes, start: int) -> int:
    """Where `run`, a pattern that also matches nothing, stops in `data` from `start`."""
    found = run(data, start)
    assert found is not None  # `*+` always matches
    return found.end()


# A framer that is done holds no state `feed` changes: this one serves every message without a
# body (every WebSocket handshake's request), with no allocation per request.
_BODILESS: Final = BodyFramer(length=0, chunked=False)
_FRAMING_NAMES: Final = frozenset({"transfer-encoding", "content-length"})


def response_framer(response: ResponseHead, *, request_method: str) -> BodyFramer:
    """How the body of `response` is delimited (RFC 9112 §6.3, rules 1-3, 5-7)."""
    status = response.status
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return _BODILESS
    if response.head.get_all("transfer-encoding"):
        return BodyFramer(length=None, chunked=True)
    length = response.head.get("content-length")
    if length is not None:
        return BodyFramer(length=int(length.split(",")[0]), chunked=False)
    return BodyFramer(length=None, chunked=False)


def request_framer(request: RequestHead, *, protected: frozenset[str] = PROTECTED_HEADERS) -> BodyFramer:
    """How the body of `request` is delimited (RFC 9112 §6.3, rules 4-6): chunked, a length, or none.

    A request never runs until the connection closes: without framing headers its body is empty,
    and what follows the head is the next request.  Trailer fields named like `protected` (the
    head parser's set: ours, framing, routing) are refused, as the head drops their aliases.
    """
    if not request.head.has_any(_FRAMING_NAMES):
        return _BODILESS  # the common case (every WebSocket upgrade): one set operation
    if request.head.get_all("transfer-encoding"):
        return BodyFramer(length=None, chunked=True, forbidden_trailers=protected)
    length = request.head.get("content-length")
    if length is not None:
        return BodyFramer(length=int(length.split(",")[0]), chunked=False)
    return _BODILESS
