"""HTTP/1.1 header vocabulary of the proxy: what is hop-by-hop, how heads are written.

Header names arrive from httptools as the peer wrote them (bytes, any case). The proxy
classifies each name with :func:`header_kind` (one table, :data:`SPECIAL_HEADERS`, for both
directions; the result is cached by the exact spelling, so a name costs one dict hit); a
name that is not in the table is end-to-end and is forwarded untouched.

Heads are built as flat lists of byte strings (``name, b": ", value, b"\\r\\n"`` per header)
and joined once, so a request costs one allocation for its head whatever its header count.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

CRLF: Final = b"\r\n"
SEP: Final = b": "

# Kinds of headers the proxy looks at. Everything else is passed through.
H_HOST: Final = 1
H_CONNECTION: Final = 2
H_HOP: Final = 3  # hop-by-hop: dropped (keep-alive, proxy-connection, te, trailer)
H_TRANSFER_ENCODING: Final = 4
H_UPGRADE: Final = 5
H_EXPECT: Final = 6
H_XFF: Final = 7
H_XF_PROTO: Final = 8
H_XF_HOST: Final = 9
H_VIA: Final = 10
H_CONTENT_LENGTH: Final = 11

SPECIAL_HEADERS: Final[dict[bytes, int]] = {
    b"host": H_HOST,
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"te": H_HOP,
    b"trailer": H_HOP,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XF_PROTO,
    b"x-forwarded-host": H_XF_HOST,
    b"via": H_VIA,
    b"content-length": H_CONTENT_LENGTH,
}

KIND_CACHE: dict[bytes, int] = {}


def header_kind(name: bytes) -> int:
    """The kind of a header name as sent (any case); 0 for an ordinary end-to-end header.
    Cached by the exact bytes, since peers send the same spellings over and over; the cache
    stops growing at 4096 names, after which unusual names cost a lower() each."""
    kind = KIND_CACHE.get(name)
    if kind is None:
        kind = SPECIAL_HEADERS.get(name.lower(), 0)
        if len(KIND_CACHE) < 4096:
            KIND_CACHE[name] = kind
    return kind


# Connection tokens that name headers the tables above already drop; any other token names
# an extra hop-by-hop header that must be removed too (RFC 9110 section 7.6.1).
_KNOWN_TOKENS: Final = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"te", b"trailer", b"proxy-connection", b"transfer-encoding"}
)

VIA_VALUE: Final = b"1.1 pointsman"
VIA_LINE: Final = b"Via: 1.1 pointsman\r\n"
XF_PROTO_LINE: Final = b"X-Forwarded-Proto: http\r\n"
CHUNKED_LINE: Final = b"Transfer-Encoding: chunked\r\n"
CLOSE_LINE: Final = b"Connection: close\r\n"
KEEP_ALIVE_LINE: Final = b"Connection: keep-alive\r\n"
UPGRADE_CONNECTION_LINE: Final = b"Connection: upgrade\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased tokens of a Connection header value."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def extra_hop_headers(tokens: list[bytes]) -> frozenset[bytes]:
    """Header names (lower case) listed in Connection beyond the standard hop-by-hop ones."""
    return frozenset(t for t in tokens if t not in _KNOWN_TOKENS)


CONNECTION_CACHE: dict[bytes, tuple[bool, frozenset[bytes] | None]] = {}


def parse_connection(value: bytes) -> tuple[bool, frozenset[bytes] | None]:
    """A Connection header value as (says close, extra hop-by-hop names or None). Cached by
    value: nearly every peer sends ``keep-alive``, ``close`` or ``Upgrade``."""
    found = CONNECTION_CACHE.get(value)
    if found is None:
        tokens = connection_tokens(value)
        found = (b"close" in tokens, extra_hop_headers(tokens) or None)
        if len(CONNECTION_CACHE) < 1024:
            CONNECTION_CACHE[value] = found
    return found


def drop_named(parts: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """``parts`` (flat name, sep, value, CRLF groups) without the headers in ``names``."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            out.extend(parts[i : i + 4])
    return out


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def is_chunked(value: bytes) -> bool:
    """True when ``chunked`` is the final (or only) transfer coding."""
    return value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``: the proxy writes the standard reason phrase, as Envoy does."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, reason(status))
        if 100 <= status < 600:
            STATUS_LINES[status] = line
    return line


def local_response(
    status: int,
    body: bytes,
    *,
    close: bool,
    head_only: bool = False,
    http10_keep_alive: bool = False,
) -> bytes:
    """A response the proxy writes itself (404, 503, 400...): short text body, explicit length."""
    return b"".join(
        (
            b"HTTP/1.1 %d %b\r\n" % (status, reason(status)),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            CLOSE_LINE if close else (KEEP_ALIVE_LINE if http10_keep_alive else b""),
            CRLF,
            b"" if head_only else body,
        )
    )


def cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a Cookie header value, or None."""
    for pair in header.split(b";"):
        key, eq, value = pair.strip().partition(b"=")
        if eq and key == name:
            return value.strip().strip(b'"')
    return None
