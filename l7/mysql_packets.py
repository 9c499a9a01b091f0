"""MySQL / MariaDB client-server protocol: constants and the codecs the session filter
(l7/mysql_filter.py) needs. Sans-IO, pure functions over byte strings.

Framing: every packet is a 3-byte little-endian payload length, a 1-byte sequence id, then
the payload. A payload of exactly 0xFFFFFF bytes is continued by the next packet (the logical
payload is the concatenation; it ends with a packet shorter than 0xFFFFFF, possibly empty).
A command starts with sequence id 0; every packet of one exchange counts up from there.

What pointsman changes in the handshake (:func:`rewrite_greeting`, :func:`rewrite_response`):
the capability flags that would make statements unreadable or change packet formats are
cleared both in the server's greeting (so a client does not ask for them) and in the client's
answer (so a client that asks anyway does not get them): compression, query attributes,
optional result-set metadata and MariaDB's progress reports, COM_MULTI, metadata caching and
bulk unit results. TLS towards the client is offered only when the listener terminates TLS;
the server is always spoken to in clear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import ParamSpec, TypeVar

from l7.errors import ProtocolError

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _strict(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Malformed input raises ProtocolError, whatever the parser tripped on."""

    @wraps(fn)
    def parse(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (IndexError, ValueError, KeyError, OverflowError) as exc:
            raise ProtocolError(f"malformed packet: {exc}") from exc

    return parse


MAX_PAYLOAD = 0xFFFFFF

# Capability flags (the low 32 bits; MariaDB's extended ones are the high 32, sent apart).
CLIENT_MYSQL = 1  # a MySQL (not MariaDB) peer: no extended capabilities field
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_COMPRESS = 0x20
CLIENT_LOCAL_FILES = 0x80
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27

# Cleared in both directions: they change the framing or the packet formats.
CLEARED = CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION | CLIENT_QUERY_ATTRIBUTES | CLIENT_OPTIONAL_RESULTSET_METADATA
# MariaDB extended capabilities kept (as the 4-byte field holds them, bit 32 = 1): bulk
# operations (COM_STMT_BULK_EXECUTE, answered by OK/ERR) and extended column metadata
# (more fields inside column definitions, which are only counted). Everything else is
# cleared: progress reports (0x1), COM_MULTI (0x2), metadata caching (0x10), bulk unit
# results (0x20) and bits not known here.
MARIADB_KEPT = 0x4 | 0x8

# Status flags (OK and EOF packets).
SERVER_STATUS_IN_TRANS = 0x0001
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_NO_BACKSLASH_ESCAPES = 0x0200

# Commands.
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STATISTICS = 0x09
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_BINLOG_DUMP_GTID = 0x1E
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA

# Errors pointsman answers with.
ER_TABLEACCESS_DENIED = 1142  # "command denied to user": the closest server error to a policy deny
ER_USER_LIMIT_REACHED = 1226  # "user has exceeded the resource": a rate limit
SQLSTATE_ACCESS = "42000"


def header(length: int, seq: int) -> bytes:
    return length.to_bytes(3, "little") + bytes((seq & 0xFF,))


def packet(payload: bytes, seq: int) -> bytes:
    """One packet, split into 0xFFFFFF continuations when needed."""
    out = bytearray()
    pos = 0
    while True:
        part = payload[pos : pos + MAX_PAYLOAD]
        out += header(len(part), seq)
        out += part
        seq += 1
        pos += len(part)
        if len(part) < MAX_PAYLOAD:
            return bytes(out)


def err_packet(code: int, sqlstate: str, message: str, seq: int = 1) -> bytes:
    """An ERR packet (protocol 4.1 form: code, '#', SQLSTATE, message)."""
    body = b"\xff" + code.to_bytes(2, "little") + b"#" + sqlstate.encode("ascii")[:5] + message.encode("utf-8")
    return packet(body, seq)


def lenenc(buf: bytes, pos: int) -> tuple[int, int]:
    """A length-encoded integer at ``pos``: (value, position after it)."""
    if pos >= len(buf):
        raise ProtocolError("truncated length-encoded integer")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None:
        raise ProtocolError(f"bad length-encoded integer prefix {first:#x}")
    end = pos + 1 + size
    if end > len(buf):
        raise ProtocolError("truncated length-encoded integer")
    return int.from_bytes(buf[pos + 1 : end], "little"), end


def ok_status(payload: bytes) -> int:
    """The status flags of an OK packet (header 0x00 or 0xFE), or of an EOF packet (0xFE,
    at most 5 bytes: warnings, status)."""
    if len(payload) < 5:
        raise ProtocolError("truncated OK/EOF packet")
    if payload[0] == 0xFE and len(payload) < 9:  # EOF: 0xFE, warnings(2), status(2)
        return int.from_bytes(payload[3:5], "little")
    _, pos = lenenc(payload, 1)  # affected rows
    _, pos = lenenc(payload, pos)  # last insert id
    if pos + 2 > len(payload):
        raise ProtocolError("truncated OK packet")
    return int.from_bytes(payload[pos : pos + 2], "little")


def err_sqlstate(payload: bytes) -> str:
    """The SQLSTATE of an ERR packet ('HY000' when it carries none)."""
    if len(payload) >= 9 and payload[3] == 0x23:  # '#'
        return payload[4:9].decode("ascii", "replace")
    return "HY000"


def err_message(payload: bytes) -> str:
    start = 9 if len(payload) >= 9 and payload[3] == 0x23 else 3
    return payload[start:].decode("utf-8", "replace")


def _cstring(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    return buf[pos:end], end + 1


@dataclass
class Greeting:
    """The server's initial handshake (protocol version 10)."""

    version: str
    connection_id: int
    capabilities: int  # the low 32 bits
    mariadb_capabilities: int  # the extended 32 bits (0 for MySQL)
    status: int
    auth_plugin: str


# Offsets of the server's capability fields, from the end of the version string.
@_strict
def parse_greeting(payload: bytes) -> tuple[Greeting, int]:
    """The greeting and the offset of its lower capability field (for rewriting)."""
    if not payload or payload[0] != 10:
        raise ProtocolError("not a protocol 10 handshake")
    version, pos = _cstring(payload, 1)
    caps_at = pos + 4 + 8 + 1
    if caps_at + 2 > len(payload):
        raise ProtocolError("truncated handshake")
    conn_id = int.from_bytes(payload[pos : pos + 4], "little")
    caps = int.from_bytes(payload[caps_at : caps_at + 2], "little")
    status = 0
    ext = 0
    plugin = ""
    if len(payload) >= caps_at + 2 + 1 + 2 + 2:
        status = int.from_bytes(payload[caps_at + 3 : caps_at + 5], "little")
        caps |= int.from_bytes(payload[caps_at + 5 : caps_at + 7], "little") << 16
        if not caps & CLIENT_MYSQL and len(payload) >= caps_at + 7 + 1 + 10:
            ext = int.from_bytes(payload[caps_at + 7 + 1 + 6 : caps_at + 7 + 1 + 10], "little")
        if caps & CLIENT_PLUGIN_AUTH:
            rest = caps_at + 7 + 1 + 10
            data_len = max(13, payload[caps_at + 7] - 8) if caps & CLIENT_SECURE_CONNECTION else 0
            name_at = rest + data_len
            if name_at <= len(payload):
                end = payload.find(b"\0", name_at)
                plugin = payload[name_at : end if end >= 0 else len(payload)].decode("ascii", "replace")
    greeting = Greeting(version.decode("utf-8", "replace"), conn_id, caps, ext, status, plugin)
    return greeting, caps_at


@_strict
def rewrite_greeting(payload: bytes, tls: bool) -> tuple[bytes, Greeting]:
    """The greeting with the capabilities pointsman cannot follow cleared (and CLIENT_SSL
    offered exactly when ``tls``), and what it said originally."""
    greeting, caps_at = parse_greeting(payload)
    caps = (greeting.capabilities & ~CLEARED & ~CLIENT_SSL) | (CLIENT_SSL if tls else 0)
    out = bytearray(payload)
    out[caps_at : caps_at + 2] = (caps & 0xFFFF).to_bytes(2, "little")
    if len(payload) >= caps_at + 7:
        out[caps_at + 5 : caps_at + 7] = (caps >> 16).to_bytes(2, "little")
    ext_at = caps_at + 7 + 1 + 6
    if not caps & CLIENT_MYSQL and len(payload) >= ext_at + 4:
        out[ext_at : ext_at + 4] = (greeting.mariadb_capabilities & MARIADB_KEPT).to_bytes(4, "little")
    return bytes(out), greeting


@dataclass
class HandshakeResponse:
    """The client's HandshakeResponse41 (or SSLRequest, which is its first 32 bytes)."""

    capabilities: int
    mariadb_capabilities: int = 0
    user: str = ""
    database: str = ""
    auth_plugin: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def ssl_request(self) -> bool:
        return bool(self.capabilities & CLIENT_SSL) and not self.user


SSL_REQUEST_SIZE = 32


@_strict
def parse_response(payload: bytes) -> HandshakeResponse:
    """A HandshakeResponse41; a 32-byte payload with CLIENT_SSL is an SSLRequest."""
    if len(payload) < 4:
        raise ProtocolError("truncated handshake response")
    caps = int.from_bytes(payload[0:4], "little")
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolError("pre-4.1 handshake response")
    if len(payload) < SSL_REQUEST_SIZE:
        raise ProtocolError("truncated handshake response")
    ext = 0 if caps & CLIENT_MYSQL else int.from_bytes(payload[28:32], "little")
    resp = HandshakeResponse(caps, ext)
    if len(payload) == SSL_REQUEST_SIZE and caps & CLIENT_SSL:
        return resp
    user, pos = _cstring(payload, SSL_REQUEST_SIZE)
    resp.user = user.decode("utf-8", "replace")
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n, pos = lenenc(payload, pos)
        pos += n
        if pos > len(payload):
            raise ProtocolError("truncated auth data")
    else:
        pos = _skip_auth_data(payload, pos, caps, "auth data")
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        db, pos = _cstring(payload, pos)
        resp.database = db.decode("utf-8", "replace")
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        end = payload.find(b"\0", pos)
        end = len(payload) if end < 0 else end
        resp.auth_plugin = payload[pos:end].decode("ascii", "replace")
        pos = end + 1
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        total, pos = lenenc(payload, pos)
        end = pos + total
        if end > len(payload):
            raise ProtocolError("truncated connection attributes")
        while pos < end:
            klen, pos = lenenc(payload, pos)
            key = payload[pos : pos + klen]
            pos += klen
            vlen, pos = lenenc(payload, pos)
            value = payload[pos : pos + vlen]
            pos += vlen
            if pos > end:
                raise ProtocolError("truncated connection attribute")
            resp.attributes[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return resp


def rewrite_response(payload: bytes) -> bytes:
    """The client's HandshakeResponse as the server gets it: CLIENT_SSL (TLS ends here) and
    the cleared capabilities removed; nothing else changes."""
    caps = int.from_bytes(payload[0:4], "little")
    out = bytearray(payload)
    out[0:4] = (caps & ~CLEARED & ~CLIENT_SSL).to_bytes(4, "little")
    if not caps & CLIENT_MYSQL and len(out) >= 32:
        ext = int.from_bytes(out[28:32], "little")
        out[28:32] = (ext & MARIADB_KEPT).to_bytes(4, "little")
    return bytes(out)


@dataclass
class ChangeUser:
    user: str
    database: str
    attributes: dict[str, str]


def _skip_auth_data(payload: bytes, pos: int, caps: int, what: str) -> int:
    """Past the auth data at ``pos``: one length byte and the data (CLIENT_SECURE_CONNECTION),
    else a NUL-terminated string. ProtocolError naming ``what`` if it runs past the end."""
    if caps & CLIENT_SECURE_CONNECTION:
        if pos >= len(payload):
            raise ProtocolError(f"truncated {what}")
        pos += 1 + payload[pos]
    else:
        _, pos = _cstring(payload, pos)
    if pos > len(payload):
        raise ProtocolError(f"truncated {what}")
    return pos


@_strict
def parse_change_user(payload: bytes, caps: int) -> ChangeUser:
    """COM_CHANGE_USER: user, auth data, database, then (4.1) charset, plugin, attributes."""
    user, pos = _cstring(payload, 1)
    pos = _skip_auth_data(payload, pos, caps, "COM_CHANGE_USER")
    db = b""
    if pos < len(payload):
        db, pos = _cstring(payload, pos)
    attrs: dict[str, str] = {}
    pos += 2  # charset
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        _, pos = _cstring(payload, pos)
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        total, pos = lenenc(payload, pos)
        end = min(pos + total, len(payload))
        while pos < end:
            klen, pos = lenenc(payload, pos)
            key = payload[pos : pos + klen]
            pos += klen
            vlen, pos = lenenc(payload, pos)
            attrs[key.decode("utf-8", "replace")] = payload[pos : pos + vlen].decode("utf-8", "replace")
            pos += vlen
    return ChangeUser(user.decode("utf-8", "replace"), db.decode("utf-8", "replace"), attrs)


def prepare_ok(payload: bytes) -> tuple[int, int, int]:
    """COM_STMT_PREPARE's OK: (statement id, columns, parameters)."""
    if len(payload) < 9 or payload[0] != 0:
        raise ProtocolError("truncated COM_STMT_PREPARE answer")
    return (
        int.from_bytes(payload[1:5], "little"),
        int.from_bytes(payload[5:7], "little"),
        int.from_bytes(payload[7:9], "little"),
    )
