"""Events of the PostgreSQL v3 decoder (l7/pg_decoder.py), one per wire message.

Frozen, slotted dataclasses. Names follow the protocol documentation. Messages whose body
the decoder does not need (DataRow, RowDescription, CopyData, password/SASL, ...) are
reported as ``RawMessage(type, length)`` as soon as their 5-byte header arrives; the body is
streamed past without being held.
"""

from __future__ import annotations

from dataclasses import dataclass


class PgMessage:
    """Base of every decoder event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class RawMessage(PgMessage):
    type: str  # the one-byte type code, e.g. "D"
    length: int  # the length field: body size + 4 (the type byte is not counted)


# --- frontend: untyped first packets -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage(PgMessage):
    major: int
    minor: int
    parameters: tuple[tuple[str, str], ...]  # in wire order: user, database, options, ...

    @property
    def params(self) -> dict[str, str]:
        return dict(self.parameters)


@dataclass(frozen=True, slots=True)
class SSLRequest(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest(PgMessage):
    pid: int
    secret: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2


# --- frontend: typed ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query(PgMessage):
    text: str


@dataclass(frozen=True, slots=True)
class Parse(PgMessage):
    statement: str  # "" is the unnamed statement
    query: str
    param_type_count: int


@dataclass(frozen=True, slots=True)
class Bind(PgMessage):
    portal: str
    statement: str


@dataclass(frozen=True, slots=True)
class Execute(PgMessage):
    portal: str
    max_rows: int  # 0 = no limit


@dataclass(frozen=True, slots=True)
class Describe(PgMessage):
    kind: str  # "S" statement or "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Close(PgMessage):
    kind: str  # "S" statement or "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Sync(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class Flush(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class Terminate(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class CopyDone(PgMessage):  # both directions
    pass


@dataclass(frozen=True, slots=True)
class CopyFail(PgMessage):
    message: str


# --- backend --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptionResponse(PgMessage):
    """The single byte answering SSLRequest ("S"/"N") or GSSENCRequest ("G"/"N")."""

    code: str

    @property
    def accepted(self) -> bool:
        return self.code != "N"


@dataclass(frozen=True, slots=True)
class Authentication(PgMessage):
    subtype: int  # 0 Ok, 3 cleartext, 5 MD5, 10 SASL, 11 SASLContinue, 12 SASLFinal, ...


@dataclass(frozen=True, slots=True)
class ParameterStatus(PgMessage):
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData(PgMessage):
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class ReadyForQuery(PgMessage):
    status: str  # "I" idle, "T" in transaction, "E" failed transaction


@dataclass(frozen=True, slots=True)
class CommandComplete(PgMessage):
    tag: str  # "SELECT 3", "INSERT 0 1", ...


@dataclass(frozen=True, slots=True)
class ErrorResponse(PgMessage):
    severity: str  # non-localized "V" field when present, else "S"
    code: str  # SQLSTATE ("C")
    message: str  # "M"
    fields: tuple[tuple[str, str], ...]  # every (field code, value), in wire order


@dataclass(frozen=True, slots=True)
class NoticeResponse(PgMessage):
    severity: str
    code: str
    message: str
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ParseComplete(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class BindComplete(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class CloseComplete(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class NoData(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class PortalSuspended(PgMessage):
    pass


@dataclass(frozen=True, slots=True)
class ParameterDescription(PgMessage):
    count: int


@dataclass(frozen=True, slots=True)
class CopyResponse(PgMessage):
    kind: str  # "G" CopyIn, "H" CopyOut, "W" CopyBoth
    format: int  # 0 text, 1 binary
    column_count: int


@dataclass(frozen=True, slots=True)
class NotificationResponse(PgMessage):
    pid: int
    channel: str
    payload: str
