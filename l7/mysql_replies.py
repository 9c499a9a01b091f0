"""The server's side of a MySQL session, as the session filter (l7/mysql_filter.py) follows
it: which packets answer which command. Sans-IO.

Every command that gets an answer is a :class:`Pending` in a FIFO (clients may pipeline).
The server's packets are scanned in place (3-byte length, sequence id, then only the first
payload byte, or the first :data:`PREFIX` bytes of the few packets that say something:
OK, ERR, EOF, a result set's column count, COM_STMT_PREPARE's OK); rows and column
definitions are skipped without being copied, so a large result set or a long BLOB row
flows through as it arrives.

Answer shapes (``kind``):

- RESULT (COM_QUERY, COM_STMT_EXECUTE, unknown commands): OK | ERR | LOCAL INFILE request
  (0xFB: the client then streams the file, the server answers OK/ERR) | a result set:
  column count, column definitions, EOF (unless CLIENT_DEPRECATE_EOF), rows, then EOF or an
  OK with header 0xFE, or ERR. SERVER_MORE_RESULTS_EXISTS in the closing OK/EOF: another
  result follows (the next statement of a multi-statement string, or a procedure's).
- PREPARE: ERR | OK (statement id, columns, params) then the parameter and column
  definitions, each group closed by EOF unless CLIENT_DEPRECATE_EOF.
- SIMPLE: one packet (COM_PING, COM_INIT_DB, COM_SET_OPTION, COM_STMT_RESET,
  COM_RESET_CONNECTION, COM_STATISTICS).
- LIST: packets until EOF/OK(0xFE) or ERR (COM_FIELD_LIST, COM_STMT_FETCH).
- AUTH: COM_CHANGE_USER's exchange until OK or ERR (AuthSwitchRequest, more data between).
- DENIED: an answer pointsman gives itself (an ERR): written when it reaches the head.
"""

from __future__ import annotations

from collections import deque

from l7.errors import ProtocolError
from l7.mysql_packets import (
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_CURSOR_EXISTS,
    lenenc,
    ok_status,
    prepare_ok,
)

PREFIX = 64  # payload bytes read of a packet that must be interpreted

RESULT, PREPARE, SIMPLE, LIST, AUTH, DENIED = range(6)
# states of a RESULT
FIRST, COLUMNS, COLUMNS_EOF, ROWS, SKIP = range(5)


class Pending:
    """One command awaiting (or being given) its answer."""

    __slots__ = ("command", "kind", "left", "prepared", "state", "stmts", "synthetic")

    def __init__(self, kind: int, command: int = 0) -> None:
        self.kind = kind
        self.command = command
        self.state = FIRST
        self.left = 0  # packets still to skip (column definitions)
        # statements it runs, in order: (verb, sent at, database a USE switches to)
        self.stmts: deque[tuple[str, float, str | None]] = deque()
        self.prepared: object = None  # PREPARE: what the statement was classified as
        self.synthetic = b""  # DENIED: the bytes to answer with


class Replies:
    """The answer tracker. The session implements the callbacks (``on_*``)."""

    def __init__(self, deprecate_eof: bool = False) -> None:
        self.fifo: deque[Pending] = deque()
        self.deprecate_eof = deprecate_eof
        self.skip = 0  # payload bytes of the current packet still to pass
        self.cont = False  # the last packet was 0xFFFFFF long: the next one continues it
        self.carry = b""  # a header (and prefix) split across chunks

    @property
    def at_boundary(self) -> bool:
        return not self.skip and not self.carry and not self.cont

    def scan(self, data: bytes) -> list[tuple[int, bytes]]:
        """Follow ``data`` (the next bytes from the server). Returns the DENIED answers that
        became due, as (offset in ``data`` after which they go, bytes), in order."""
        out: list[tuple[int, bytes]] = []
        carry = self.carry
        if carry:
            buf = carry + data
            base = len(carry)
            self.carry = b""
        else:
            buf = data
            base = 0
        n = len(buf)
        pos = 0  # a carried packet starts the buffer
        if self.skip:
            if self.skip >= len(data):
                self.skip -= len(data)
                return out
            pos += self.skip
            self.skip = 0
        fifo = self.fifo
        while True:
            if fifo and fifo[0].kind == DENIED and not self.cont and base <= pos <= n:
                while fifo and fifo[0].kind == DENIED:
                    out.append((pos - base, fifo.popleft().synthetic))
            if pos >= n:
                break
            if n - pos < 5:
                if n - pos == 4 and buf[pos] == 0 and buf[pos + 1] == 0 and buf[pos + 2] == 0:
                    pass  # an empty packet: no payload byte to wait for
                else:
                    self.carry = bytes(buf[pos:])
                    break
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            end = pos + 4 + length
            if self.cont:
                self.cont = length == 0xFFFFFF
                pos = end
                continue
            self.cont = length == 0xFFFFFF
            if not fifo:
                first = buf[pos + 4] if length else -1
                if first != 0xFF:
                    raise ProtocolError(f"server packet {first:#x} with no command pending")
            head = fifo[0] if fifo else None
            first = buf[pos + 4] if length else -1
            if head is not None and head.state >= COLUMNS and first != 0xFE and first != 0xFF and head.kind != AUTH:
                # a column definition or a row: only counted
                if head.state == SKIP or head.state == COLUMNS:
                    head.left -= 1
                    if head.left <= 0:
                        self._columns_done(head)
                pos = end
                continue
            if (
                head is not None
                and head.kind == RESULT
                and (first == 0 or first == 0xFE)
                and (head.state == ROWS or head.state == FIRST)
                and 5 <= length < PREFIX
                and end <= n
            ):  # the common end of a result, read in place
                q = pos + 5
                if first == 0xFE and length < 9:  # EOF
                    status = buf[q + 2] | buf[q + 3] << 8
                else:  # OK: affected rows, last insert id (length-encoded), status
                    a = buf[q]
                    q += 1 if a < 0xFB else 3 if a == 0xFC else 4 if a == 0xFD else 9
                    if q >= end:
                        raise ProtocolError("truncated OK packet")
                    a = buf[q]
                    q += 1 if a < 0xFB else 3 if a == 0xFC else 4 if a == 0xFD else 9
                    if q + 2 > end:
                        raise ProtocolError("truncated OK packet")
                    status = buf[q] | buf[q + 1] << 8
                self._closed(head, status)
                pos = end
                continue
            need = length if length < PREFIX else PREFIX
            if n - pos - 4 < need:
                self.carry = bytes(buf[pos:])
                break
            self.packet(head, first, length, bytes(buf[pos + 4 : pos + 4 + need]))
            pos = end
        if pos > n:
            self.skip = pos - n
        return out

    def _columns_done(self, head: Pending) -> None:
        if head.state == SKIP:  # PREPARE's definitions all passed
            self.finish()
        elif self.deprecate_eof:
            head.state = ROWS
        else:
            head.state = COLUMNS_EOF

    def finish(self) -> None:
        self.fifo.popleft()

    # -- one interpreted packet --------------------------------------------------------------

    def packet(self, head: Pending | None, first: int, length: int, prefix: bytes) -> None:
        if first == 0xFF:
            self.on_error(head, prefix)
            if head is not None:
                self.finish()
            return
        assert head is not None
        kind = head.kind
        if kind == RESULT:
            self._result(head, first, length, prefix)
        elif kind == SIMPLE:
            if first == 0 or (first == 0xFE and length < 0xFFFFFF and length >= 5):
                self.on_ok(head, ok_status(prefix), end=True)
            else:
                self.on_other(head)
            self.finish()
        elif kind == PREPARE:
            if head.state == FIRST:
                stmt_id, columns, params = prepare_ok(prefix)
                eofs = 0 if self.deprecate_eof else (params > 0) + (columns > 0)
                self.on_prepared(head, stmt_id)
                head.left = params + columns + eofs
                if head.left == 0:
                    self.finish()
                else:
                    head.state = SKIP
            else:  # an EOF between or after the definitions
                head.left -= 1
                if head.left <= 0:
                    self.finish()
        elif kind == LIST:
            if first == 0xFE and length < 0xFFFFFF:
                self.on_ok(head, ok_status(prefix), end=False)
                self.finish()
        elif kind == AUTH:
            if first == 0:
                self.on_ok(head, ok_status(prefix), end=True)
                self.on_auth_done(head, True)
                self.finish()
        else:  # pragma: no cover - DENIED is never the head here
            raise ProtocolError("server answer to a refused command")

    def _result(self, head: Pending, first: int, length: int, prefix: bytes) -> None:
        state = head.state
        if state == FIRST:
            if first == 0 or first == 0xFE:
                self._closed(head, ok_status(prefix))
            elif first == 0xFB:
                self.on_infile(head)
            else:
                columns, _ = lenenc(prefix, 0)
                if columns == 0:
                    raise ProtocolError("result set without columns")
                head.state = COLUMNS
                head.left = columns
        elif state == COLUMNS_EOF:
            if first != 0xFE:
                raise ProtocolError("no EOF after the column definitions")
            status = ok_status(prefix)
            if status & SERVER_STATUS_CURSOR_EXISTS:  # rows come with COM_STMT_FETCH
                self._closed(head, status)
            else:
                head.state = ROWS
        elif state == ROWS:  # 0xFE: the result's end (a row starting so is >= 16 MiB)
            if length >= 0xFFFFFF:
                return
            self._closed(head, ok_status(prefix))
        else:
            raise ProtocolError("unexpected packet in the column definitions")

    def _closed(self, head: Pending, status: int) -> None:
        """One result ended; another follows if the server says so."""
        self.on_ok(head, status, end=True)
        if status & SERVER_MORE_RESULTS_EXISTS:
            head.state = FIRST
        else:
            self.finish()

    # -- callbacks ---------------------------------------------------------------------------

    def on_ok(self, head: Pending, status: int, *, end: bool) -> None:
        """An OK or EOF (``end``: a statement's result ended successfully)."""

    def on_error(self, head: Pending | None, prefix: bytes) -> None:
        """An ERR packet (``prefix``: its first bytes: code, SQLSTATE)."""

    def on_other(self, head: Pending) -> None:
        """A SIMPLE answer that is neither OK nor ERR (COM_STATISTICS' text)."""

    def on_prepared(self, head: Pending, stmt_id: int) -> None:
        """COM_STMT_PREPARE succeeded."""

    def on_infile(self, head: Pending) -> None:
        """LOCAL INFILE request: the client sends the file next."""

    def on_auth_done(self, head: Pending, ok: bool) -> None:
        """COM_CHANGE_USER's exchange ended."""
