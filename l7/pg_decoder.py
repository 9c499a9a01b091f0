"""Sans-IO PostgreSQL v3 wire-protocol decoder, both directions.

``PgFrontendDecoder`` reads client→server bytes, ``PgBackendDecoder`` server→client bytes.
``feed(data)`` returns the events (l7/pg_messages.py) of every message completed so far; any
split of the stream gives the same events. The decoder only *observes*: the proxy forwards
the same bytes unchanged. Bodies it does not need (DataRow, CopyData, RowDescription,
password/SASL, ...) are reported as ``RawMessage(type, length)`` when their header arrives and
then skipped without being copied, so a 5 MiB DataRow never sits in the decoder's buffer.

Layouts (all integers big-endian; "cstring" is NUL-terminated):

    typed message      type:1 byte | length:int32 (counts itself, not the type) | body
    untyped (startup)  length:int32 (counts itself) | code:int32 | body
        code 196608 = 3<<16|0   StartupMessage: (name cstring, value cstring)* then NUL
        code 80877103           SSLRequest      (length 8)
        code 80877104           GSSENCRequest   (length 8)
        code 80877102           CancelRequest:  pid int32 | secret key (4 bytes; 3.2: ≤256)

Nothing here touches sockets, clocks or metrics. Malformed input raises ``ProtocolError`` and
poisons the decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from l7 import pg_messages as m
from l7.errors import ProtocolError

MAX_MESSAGE_SIZE = 1 << 30  # default cap on a message the decoder buffers (1 GiB)
MAX_STARTUP_SIZE = 10_000  # the server's own limit on an untyped startup packet
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_UINT16 = struct.Struct("!H")  # counts are unsigned on the wire
_HEADER = struct.Struct("!cI")  # type byte, length


class _Reader:
    """Cursor over one message body; any overrun is a ProtocolError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(f"{self._what}: truncated field")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def byte(self) -> str:
        return chr(self._take(1)[0])

    def uint16(self) -> int:
        return int(_UINT16.unpack(self._take(2))[0])

    def int32(self) -> int:
        return int(_INT32.unpack(self._take(4))[0])

    def cstring(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise ProtocolError(f"{self._what}: unterminated string")
        out = self._data[self._pos : end].decode("utf-8", "replace")
        self._pos = end + 1
        return out

    def rest(self) -> bytes:
        return self._take(len(self._data) - self._pos)

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{self._what}: {len(self._data) - self._pos} unexpected trailing bytes")


_Parser = Callable[[_Reader], m.PgMessage]


def _empty(cls: type[m.PgMessage]) -> _Parser:
    def parse(r: _Reader) -> m.PgMessage:
        r.done()
        return cls()

    return parse


def _text(cls: type[m.Query] | type[m.CommandComplete] | type[m.CopyFail]) -> _Parser:
    def parse(r: _Reader) -> m.PgMessage:
        msg = cls(r.cstring())  # body: one cstring (query text, command tag, failure reason)
        r.done()
        return msg

    return parse


def _report(cls: type[m.ErrorResponse] | type[m.NoticeResponse]) -> _Parser:
    def parse(r: _Reader) -> m.PgMessage:
        # ErrorResponse/NoticeResponse: (field code byte, value cstring)* then a 0 byte.
        # S = severity (localized), V = severity (non-localized, 9.6+), C = SQLSTATE, M = message
        fields = []
        while (code := r.byte()) != "\0":
            fields.append((code, r.cstring()))
        r.done()
        d = dict(fields)
        return cls(d.get("V", d.get("S", "")), d.get("C", ""), d.get("M", ""), tuple(fields))

    return parse


def _parse(r: _Reader) -> m.PgMessage:
    # Parse: statement cstring | query cstring | n uint16 | n x param type oid int32
    name, query, n = r.cstring(), r.cstring(), r.uint16()
    if r.remaining() != 4 * n:
        raise ProtocolError("Parse: parameter type count does not match the length")
    return m.Parse(name, query, n)


def _bind(r: _Reader) -> m.PgMessage:
    # Bind: portal cstring | statement cstring | formats, values, result formats (not decoded)
    return m.Bind(r.cstring(), r.cstring())


def _execute(r: _Reader) -> m.PgMessage:
    msg = m.Execute(r.cstring(), r.int32())  # portal cstring | max rows int32
    r.done()
    return msg


def _kind_name(cls: type[m.Describe] | type[m.Close]) -> _Parser:
    def parse(r: _Reader) -> m.PgMessage:
        kind = r.byte()  # "S" statement or "P" portal, then name cstring
        if kind not in ("S", "P"):
            raise ProtocolError(f"{cls.__name__}: kind {kind!r} is not S or P")
        msg = cls(kind, r.cstring())
        r.done()
        return msg

    return parse


def _auth(r: _Reader) -> m.PgMessage:
    return m.Authentication(r.int32())  # subtype int32 | subtype-specific data (not decoded)


def _param_status(r: _Reader) -> m.PgMessage:
    msg = m.ParameterStatus(r.cstring(), r.cstring())
    r.done()
    return msg


def _key_data(r: _Reader) -> m.PgMessage:
    pid, secret = r.int32(), r.rest()  # pid int32 | secret key (4 bytes; 3.2: up to 256)
    if not 4 <= len(secret) <= 256:
        raise ProtocolError("BackendKeyData: bad secret key length")
    return m.BackendKeyData(pid, secret)


def _ready(r: _Reader) -> m.PgMessage:
    status = r.byte()
    r.done()
    if status not in ("I", "T", "E"):
        raise ProtocolError(f"ReadyForQuery: bad status {status!r}")
    return m.ReadyForQuery(status)


def _param_desc(r: _Reader) -> m.PgMessage:
    n = r.uint16()  # n uint16 | n x type oid int32
    if r.remaining() != 4 * n:
        raise ProtocolError("ParameterDescription: count does not match the length")
    return m.ParameterDescription(n)


def _copy_response(kind: str) -> _Parser:
    def parse(r: _Reader) -> m.PgMessage:
        fmt, n = r.byte(), r.uint16()  # overall format int8 | n uint16 | n x format int16
        if r.remaining() != 2 * n:
            raise ProtocolError("CopyResponse: column count does not match the length")
        return m.CopyResponse(kind, ord(fmt), n)

    return parse


def _notification(r: _Reader) -> m.PgMessage:
    msg = m.NotificationResponse(r.int32(), r.cstring(), r.cstring())  # pid | channel | payload
    r.done()
    return msg


# Typed messages decoded (buffered whole). Every other type is streamed as a RawMessage.
_FRONTEND: dict[bytes, _Parser] = {
    b"Q": _text(m.Query),
    b"P": _parse,
    b"B": _bind,
    b"E": _execute,
    b"D": _kind_name(m.Describe),
    b"C": _kind_name(m.Close),
    b"S": _empty(m.Sync),
    b"H": _empty(m.Flush),
    b"X": _empty(m.Terminate),
    b"c": _empty(m.CopyDone),
    b"f": _text(m.CopyFail),
}
_FRONTEND_RAW = frozenset(b"dpF")  # CopyData, password/SASL, FunctionCall

_BACKEND: dict[bytes, _Parser] = {
    b"R": _auth,
    b"S": _param_status,
    b"K": _key_data,
    b"Z": _ready,
    b"C": _text(m.CommandComplete),
    b"E": _report(m.ErrorResponse),
    b"N": _report(m.NoticeResponse),
    b"1": _empty(m.ParseComplete),
    b"2": _empty(m.BindComplete),
    b"3": _empty(m.CloseComplete),
    b"I": _empty(m.EmptyQueryResponse),
    b"n": _empty(m.NoData),
    b"s": _empty(m.PortalSuspended),
    b"t": _param_desc,
    b"G": _copy_response("G"),
    b"H": _copy_response("H"),
    b"W": _copy_response("W"),
    b"c": _empty(m.CopyDone),
    b"A": _notification,
}
# RowDescription, DataRow, CopyData, NegotiateProtocolVersion, FunctionCallResponse
_BACKEND_RAW = frozenset(b"TDdvV")

_STARTUP, _TYPED, _ENCRYPTION, _CLOSED = "startup", "typed", "encryption", "closed"
_NAMES = {bytes([i]): chr(i) for i in range(256)}  # type byte -> its one-character name


class _Decoder:
    """Framing shared by both directions: header, buffered body or skipped body."""

    _parsers: dict[bytes, _Parser] = {}
    _raw: frozenset[int] = frozenset()
    _streamed: frozenset[bytes] = frozenset()  # decoded from their first bytes, body skipped

    def __init__(self, *, strict: bool = True, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.strict = strict  # an unknown type byte is a ProtocolError (else streamed as raw)
        self.max_message_size = max_message_size
        self._mode = _TYPED
        self._buf = bytearray()  # partial header, or the body of a message being buffered
        self._type: bytes = b""  # type of the message whose body is being buffered
        self._body_len = -1  # -1: reading a header
        self._skip = 0  # bytes of a raw body still to stream past
        self._failed: str | None = None
        # Stream offsets, for a proxy that must cut or hold whole messages: ``offset`` counts
        # every byte fed; ``ends[i]`` is the offset just past the message of the i-th event of
        # the last feed (for a RawMessage: past its body, which may not have arrived yet).
        # Messages are contiguous, so a message starts where the previous one ended.
        self.offset = 0
        self.ends: list[int] = []
        # A proxy that only forwards DataRow/CopyData/RowDescription can do without their
        # events (their bytes are still accounted for by the next event's offset).
        self.report_raw = True
        self._msg_start = 0  # where the message being read began

    @property
    def buffered(self) -> int:
        """Bytes held right now (a partial header or a decoded message's partial body)."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        return self._body_len < 0 and not self._buf and not self._skip

    @property
    def partial_start(self) -> int | None:
        """Offset where an incomplete message that will be decoded (a partial header, or a
        body being buffered) began; None at a boundary or while a raw body streams past."""
        if self._skip or (self._body_len < 0 and not self._buf):
            return None
        return self._msg_start

    @property
    def idle(self) -> bool:
        """At a message boundary of the typed stream, not failed: a caller that parsed whole
        messages itself may :meth:`advance` past them."""
        return self._failed is None and self._mode == _TYPED and self._body_len < 0 and not self._skip and not self._buf

    def advance(self, n: int) -> None:
        """``n`` bytes of whole messages went past, parsed and checked by the caller (only
        when :attr:`idle`): the offsets move on, no events."""
        self.offset += n
        self.ends = []

    def _set_mode(self, mode: str) -> None:
        if not self.at_boundary:
            raise ProtocolError(f"cannot expect a {mode} message in the middle of a message")
        self._mode = mode

    def feed(self, data: bytes | bytearray | memoryview) -> list[m.PgMessage]:
        """Observe more bytes of the stream; return the events of the messages they complete."""
        if self._failed is not None:
            raise ProtocolError(self._failed)
        try:
            events: list[m.PgMessage] = []
            ends: list[int] = []
            self.ends = ends
            pos = 0
            if type(data) is bytes and self._mode == _TYPED and self._body_len < 0 and not self._skip and not self._buf:
                pos = self._whole(data, events, ends)
                if pos == len(data):
                    self.offset += pos
                    return events
            return self._feed(memoryview(data).cast("B"), pos, events, ends)
        except ProtocolError as exc:
            self._failed = str(exc)
            raise

    def _whole(self, data: bytes, events: list[m.PgMessage], ends: list[int]) -> int:
        """The fast path: messages that lie whole in ``data``, parsed from it without copying
        into the buffer. Stops (returning where) at anything else: a partial message, or one
        the general path must judge (a bad length, an unknown type, a message over the cap)."""
        pos, end = 0, len(data)
        parsers, raw, report_raw, names = self._parsers, self._raw, self.report_raw, _NAMES
        base = self.offset
        unpack = _HEADER.unpack_from
        while end - pos >= 5:
            kind, length = unpack(data, pos)
            stop = pos + 1 + length
            if length < 4 or stop > end:
                break
            parser = parsers.get(kind)
            if parser is not None:
                if length > self.max_message_size and kind not in self._streamed:
                    break
                events.append(parser(_Reader(data[pos + 5 : stop], names[kind])))
                ends.append(base + stop)
            elif data[pos] in raw:
                if report_raw:
                    events.append(m.RawMessage(names[kind], length))
                    ends.append(base + stop)
            else:
                break
            pos = stop
        return pos

    def _feed(self, data: memoryview, pos: int, events: list[m.PgMessage], ends: list[int]) -> list[m.PgMessage]:
        base = self.offset  # the stream offset of data[0]
        end, buf = len(data), self._buf
        try:
            while pos < end:
                if self._skip:  # streaming a raw body past: no copy
                    k = min(self._skip, end - pos)
                    self._skip -= k
                    pos += k
                elif self._body_len >= 0:  # buffering a body we decode
                    k = min(self._body_len - len(buf), end - pos)
                    buf += data[pos : pos + k]
                    pos += k
                    if len(buf) == self._body_len:
                        events.append(self._finish())
                        ends.append(base + pos)
                    elif self._type in self._streamed and (event := self._early()) is not None:
                        events.append(event)
                        ends.append(base + pos + self._skip)
                elif self._mode == _CLOSED:
                    raise ProtocolError("data after a CancelRequest")
                elif self._mode == _ENCRYPTION and data[pos] in b"SNG":
                    # the one-byte answer to SSLRequest ("S"/"N") or GSSENCRequest ("G"/"N")
                    events.append(m.EncryptionResponse(chr(data[pos])))
                    pos += 1
                    ends.append(base + pos)
                    self._mode = _TYPED
                else:
                    if self._mode == _ENCRYPTION:  # e.g. an ErrorResponse instead of the byte
                        self._mode = _TYPED
                    if not buf:
                        self._msg_start = base + pos
                    size = 4 if self._mode == _STARTUP else 5
                    k = min(size - len(buf), end - pos)
                    buf += data[pos : pos + k]
                    pos += k
                    if len(buf) == size and (event := self._header()) is not None:
                        events.append(event)
                        ends.append(base + pos + self._skip)
        finally:
            self.offset = base + pos
        return events

    def _header(self) -> m.PgMessage | None:
        buf = self._buf
        if self._mode == _STARTUP:
            # untyped: length int32 (counts itself) — the body starts with the request code
            (length,) = _UINT32.unpack(buf)
            if not 8 <= length <= MAX_STARTUP_SIZE:
                raise ProtocolError(f"startup packet length {length} out of range")
            self._type = b""
        else:
            kind, length = _HEADER.unpack(buf)
            if length < 4:
                raise ProtocolError(f"message {kind!r} has length {length} < 4")
            if kind not in self._parsers:
                if self.strict and kind[0] not in self._raw:
                    raise ProtocolError(f"unknown message type {kind!r}")
                buf.clear()
                self._skip = length - 4
                return m.RawMessage(kind.decode("latin-1"), length) if self.report_raw else None
            if length > self.max_message_size and kind not in self._streamed:
                raise ProtocolError(f"message {kind!r} length {length} over {self.max_message_size}")
            self._type = kind
        buf.clear()
        self._body_len = length - 4
        return self._finish() if self._body_len == 0 else None

    def _early(self) -> m.PgMessage | None:
        """A streamed message (Bind) is reported once its leading names have arrived; the
        rest of its body (parameter values, which may be large) is skipped, not buffered."""
        if self._buf.count(b"\0") < 2:
            return None
        r = _Reader(bytes(self._buf), self._type.decode("latin-1"))
        event = m.Bind(r.cstring(), r.cstring())  # portal cstring | statement cstring | ...
        self._skip = self._body_len - len(self._buf)
        self._buf.clear()
        self._body_len = -1
        return event

    def _finish(self) -> m.PgMessage:
        body = bytes(self._buf)
        self._buf.clear()
        self._body_len = -1
        if self._type == b"":
            return self._startup(_Reader(body, "startup packet"))
        return self._parsers[self._type](_Reader(body, self._type.decode("latin-1")))

    def _startup(self, r: _Reader) -> m.PgMessage:
        raise ProtocolError("unexpected startup packet")


class PgFrontendDecoder(_Decoder):
    """Client → server. Starts expecting the untyped startup packet."""

    _parsers = _FRONTEND
    _raw = _FRONTEND_RAW
    _streamed = frozenset({b"B"})  # Bind: only the portal and statement names are needed

    def __init__(self, *, strict: bool = True, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(strict=strict, max_message_size=max_message_size)
        self._mode = _STARTUP

    def expect_startup(self) -> None:
        """The next message is an untyped startup packet (set automatically after an
        SSLRequest/GSSENCRequest: if the server answered "N" the client sends one; after "S"/"G"
        the stream is encrypted and must no longer be fed)."""
        self._set_mode(_STARTUP)

    def _startup(self, r: _Reader) -> m.PgMessage:
        code = r.int32()
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            r.done()  # stay in startup mode: the real StartupMessage may follow
            return m.SSLRequest() if code == SSL_REQUEST_CODE else m.GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            pid, secret = r.int32(), r.rest()  # pid int32 | secret key (4 bytes; 3.2: ≤256)
            if not 4 <= len(secret) <= 256:
                raise ProtocolError("CancelRequest: bad secret key length")
            self._mode = _CLOSED
            return m.CancelRequest(pid, secret)
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise ProtocolError(f"unsupported protocol version {major}.{minor}")
        params = []
        while name := r.cstring():  # (name cstring, value cstring)* terminated by an empty name
            params.append((name, r.cstring()))
        r.done()
        self._mode = _TYPED
        return m.StartupMessage(major, minor, tuple(params))


class PgBackendDecoder(_Decoder):
    """Server → client. Typed messages from the first byte."""

    _parsers = _BACKEND
    _raw = _BACKEND_RAW

    def expect_ssl_response(self) -> None:
        """The next byte answers an SSLRequest/GSSENCRequest: "S"/"G" (accepted) or "N". After
        "S"/"G" the stream is encrypted and must no longer be fed; an "E" instead of the byte is
        decoded as an ErrorResponse."""
        self._set_mode(_ENCRYPTION)


# --- builders for the proxy's own answers ----------------------------------------------------


def build_message(kind: bytes, body: bytes) -> bytes:
    """type:1 | length:int32 (body + 4) | body."""
    return kind + _UINT32.pack(len(body) + 4) + body


def report(kind: bytes, fields: Iterable[tuple[str, str]]) -> bytes:
    """An ErrorResponse (``E``) or NoticeResponse (``N``): (field code, cstring)* then NUL."""
    out = bytearray()
    for key, value in fields:
        out += key.encode() + value.replace("\0", "").encode("utf-8") + b"\0"
    return build_message(kind, bytes(out + b"\0"))


def _fields(severity: str, code: str, message: str) -> list[tuple[str, str]]:
    # S = localized severity, V = non-localized, C = SQLSTATE, M = message
    return [("S", severity), ("V", severity), ("C", code), ("M", message)]


def error_response(message: str, code: str = "42501", severity: str = "ERROR") -> bytes:
    """ErrorResponse bytes; 42501 is insufficient_privilege."""
    return report(b"E", _fields(severity, code, message))


def notice_response(message: str, code: str = "01000", severity: str = "WARNING") -> bytes:
    return report(b"N", _fields(severity, code, message))


def ready_for_query(status: str = "I") -> bytes:
    if status not in ("I", "T", "E"):
        raise ValueError(f"bad transaction status {status!r}")
    return build_message(b"Z", status.encode())
