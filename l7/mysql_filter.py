"""The MySQL / MariaDB session filter: client and server bytes in, counting and policy out.
Sans-IO, the counterpart of l7/pg_filter.py.

One :class:`MySqlSession` per client connection; the proxy (router/mysql_proxy.py) connects
to the server at once (the server speaks first) and hands the session each side's bytes.

- Handshake: the server's greeting is rewritten (l7/mysql_packets.py: compression, query
  attributes and the MariaDB extensions that change packet formats cleared; CLIENT_SSL
  offered only when the listener terminates TLS). An SSLRequest starts TLS towards the
  client (:meth:`MySqlHooks.start_tls`); the server, spoken to in clear, never sees it, so
  every packet of the authentication exchange after it has its sequence id shifted by one.
  The client's HandshakeResponse gives the user, database and ``program_name`` (identity);
  authentication (any plugin, AuthSwitchRequest, extra rounds) passes untouched.
- Commands: a command packet (sequence id 0) whose verdict is needed - COM_QUERY,
  COM_STMT_PREPARE - is held until complete; COM_STMT_EXECUTE is judged from its statement
  id; everything else, and every packet that is not a command (a LOCAL INFILE file, the
  rest of a long packet, authentication data), flows as it arrives.
- Deny: the proxy answers an ERR packet itself (1142 / 1226 for a rate limit, SQLSTATE
  42000, the message naming the rule) and the command never reaches the server. MySQL
  errors do not end transactions, so client and server stay in step. A refusal is queued
  behind the answers to commands sent before it (l7/mysql_replies.py).
- Undecodable bytes: counted; the connection is closed when a deny/rate-limit rule can apply
  to it or the handshake has not completed, otherwise forwarded blind from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from l7 import mysql_packets as p
from l7.errors import ProtocolError
from l7.model import Identity, Statement
from l7.mysql_commands import _FORWARD, CommandsMixin
from l7.mysql_replies import AUTH, DENIED, SIMPLE, Pending, Replies
from l7.policy import Decision, PolicyEngine
from l7.sql_context import SqlContext
from l7.sql_session import PreparedStatements

log = logging.getLogger("pointsman.sql")
policy_log = logging.getLogger("pointsman.sql.policy")

GREETING, HANDSHAKE, AUTHENTICATING, COMMANDS = range(4)
_F_HOLD, _F_STREAM, _F_DROP = range(3)  # the fate of a packet's bytes (and of its continuations)
_HELD = {p.COM_QUERY, p.COM_STMT_PREPARE, p.COM_INIT_DB, p.COM_CHANGE_USER}
_BY_ID = {p.COM_STMT_EXECUTE, p.COM_STMT_BULK_EXECUTE}
_OUTCOMES = {"COMMIT": "committed", "ROLLBACK": "rolled_back"}


class MySqlHooks(Protocol):
    """What the session asks of the proxy around it."""

    def start_tls(self, early: bytes = b"") -> None:
        """The client sent SSLRequest: wrap the client connection in TLS, starting with
        ``early`` (TLS bytes that arrived with the SSLRequest); later bytes reach
        :meth:`MySqlSession.from_client` decrypted."""

    def pause(self, seconds: float) -> None:
        """Stop reading the client and call :meth:`MySqlSession.resume` after ``seconds``."""

    def close(self, reason: str) -> None:
        """Close both sides now."""


class MySqlSession(CommandsMixin, Replies):
    """One client connection's view of the protocol: identity, statements, policy."""

    def __init__(
        self,
        context: Callable[[], SqlContext],
        to_server: Callable[[bytes], object],
        to_client: Callable[[bytes], object],
        hooks: MySqlHooks,
        peer: str = "",
    ) -> None:
        super().__init__()
        self._context = context
        self.ctx = context()
        self.to_server = to_server
        self.to_client = to_client
        self.hooks = hooks
        self.peer = peer
        self.phase = GREETING
        self.caps = 0  # what the client asked for (after pointsman's clearing)
        self.user = ""
        self.database = ""
        self.app = ""
        self.who: tuple[str, ...] = ()
        self.identity: Identity | None = None  # known once the HandshakeResponse is read
        self.started = False
        self.closed = False
        self.passthrough = False
        self.other_strings = False  # NO_BACKSLASH_ESCAPES in the server's status flags
        self.prepared = PreparedStatements()  # SQL PREPARE names
        self.statements: dict[int, list[Statement]] = {}  # protocol statement id -> classification
        self._shift = 0  # 1 after an SSLRequest: the server never saw it
        self._cbuf = bytearray()  # client bytes not yet handled
        self._cskip = 0  # payload bytes of the current client packet still to stream / drop
        self._cfate = _F_STREAM
        self._ccont = False  # the last client packet was 0xFFFFFF long
        self._held = bytearray()  # a held command's payload, across continuation packets
        self._infile = False  # the client is sending a LOCAL INFILE file
        self._auth = False  # client packets with sequence id > 0 are authentication data
        self._paused = False
        self._released: Decision | None = None
        self._pending_stmts: Sequence[Statement] = ()
        self._keys: dict[str, tuple[str, ...]] = {}
        self._dkeys: dict[str, tuple[str, ...]] = {}
        self._allowed: dict[int, PolicyEngine] = {}  # statement id -> engine that allowed it outright
        self._plain: dict[int, Statement] = {}
        self._plain_engine: PolicyEngine | None = None
        self._ended = False
        self._sbuf = bytearray()  # server bytes during the handshake (whole packets are rewritten)
        self._requeue = b""  # a command held for a delay after its bytes left the buffer
        self._unsent = b""
        self.reply_seq = 1  # the sequence id of an answer pointsman gives (after a one-packet command)
        self._last_prepared: list[Statement] | None = None  # the latest COM_STMT_PREPARE's
        self._last_denied: Decision | None = None  # ... when policy refused it

    # -- client → server ------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.passthrough:
            self.to_server(data)
            return
        if self.closed:
            return
        cbuf = self._cbuf
        if self._paused:
            cbuf += data
            return
        if (
            not cbuf
            and self.phase == COMMANDS
            and not self._cskip
            and not self._ccont
            and len(data) > 4
            and data[3] == 0
            and data[4] == 3
            and (data[0] | data[1] << 8 | data[2] << 16) + 4 == len(data) < 0xFFFFFF
        ):  # the common case: a chunk that is exactly one COM_QUERY
            self.ctx = self._context()
            self._command_query(data[5:], data)
            return
        if cbuf:
            cbuf += data
            buf: bytes | bytearray = cbuf
        else:
            buf = data
        try:
            used = self._client_bytes(buf)
        except ProtocolError as exc:
            self._decode_failed("client", exc)
            return
        if buf is cbuf:
            del cbuf[:used]
        elif used < len(buf):
            cbuf += buf[used:]
        if self._requeue:
            cbuf[:0] = self._requeue
            self._requeue = b""

    def resume(self) -> None:
        """A rate-limit delay is over: send the held command, go on with the rest."""
        self._paused = False
        if not self.closed and self._cbuf:
            self.from_client(b"")

    def _client_bytes(self, buf: bytes | bytearray) -> int:
        """Handle what can be handled of ``buf``; how many bytes were used."""
        self.ctx = self._context()
        n = len(buf)
        pos = fwd = 0  # fwd: start of the run of bytes to forward as they are
        out = self.to_server
        try:
            while pos < n and not self._paused and not self.closed:
                if self._cskip:
                    take = min(self._cskip, n - pos)
                    self._cskip -= take
                    if self._cfate == _F_DROP:
                        if fwd < pos:
                            out(bytes(buf[fwd:pos]))
                        fwd = pos + take
                    pos += take
                    continue
                if n - pos < 4:
                    break
                length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
                seq = buf[pos + 3]
                end = pos + 4 + length
                cont, self._ccont = self._ccont, length == 0xFFFFFF
                if self._infile:  # file packets stand alone; an empty one ends the file
                    cont = self._ccont = False
                if cont and self._cfate == _F_HOLD:
                    if end > n:
                        self._ccont = True
                        break
                    self._held += buf[pos + 4 : end]
                    if fwd < pos:
                        out(bytes(buf[fwd:pos]))
                    fwd = pos = end
                    if not self._ccont:
                        self._held_done()
                    continue
                if cont or (self.phase == COMMANDS and (seq != 0 or self._infile or self._auth)):
                    if not cont:
                        if not (self._infile or self._auth):
                            raise ProtocolError(f"client packet with sequence id {seq} outside an exchange")
                        if self._infile and length == 0:
                            self._infile = False
                        self._cfate = _F_STREAM
                    if self._cfate == _F_DROP:
                        if fwd < pos:
                            out(bytes(buf[fwd:pos]))
                        fwd = min(end, n)
                    pos = min(end, n)
                    self._cskip = end - pos
                    continue
                if self.phase != COMMANDS:
                    if end > n:
                        self._ccont = False
                        break
                    if fwd < pos:
                        out(bytes(buf[fwd:pos]))
                    if length == 0xFFFFFF:
                        raise ProtocolError("handshake packet too long")
                    fwd = pos = end
                    if self._handshake_packet(bytes(buf[pos - length : end]), seq):
                        # TLS starts here: what follows (a ClientHello sent right behind the
                        # SSLRequest) belongs to the TLS layer, not to this decoder
                        self.hooks.start_tls(bytes(buf[end:]))
                        fwd = pos = n
                        break
                    continue
                if length == 0:
                    raise ProtocolError("empty command packet")
                if n - pos < 5:
                    self._ccont = False
                    break
                command = buf[pos + 4]
                if command in _HELD:
                    if end > n:
                        self._ccont = False
                        break
                    payload = bytes(buf[pos + 4 : end])
                    if self._ccont:  # the rest comes in continuation packets
                        if fwd < pos:
                            out(bytes(buf[fwd:pos]))
                        self._held[:] = payload
                        self._cfate = _F_HOLD
                        fwd = pos = end
                        continue
                    raw = bytes(buf[pos:end])
                    verdict = self._command(command, payload, raw)
                    if verdict is None:  # paused or closed: the command stays in the buffer
                        self._ccont = False
                        break
                    if verdict is not _FORWARD:
                        if fwd < pos:
                            out(bytes(buf[fwd:pos]))
                        fwd = end
                    pos = end
                    continue
                if n < min(end, pos + 9):  # the first bytes say what it does
                    self._ccont = False
                    break
                if command in _BY_ID:
                    if length < 5:
                        raise ProtocolError("truncated statement command")
                    stmt_id = int.from_bytes(buf[pos + 5 : pos + 9], "little")
                    verdict = self._execute(command, stmt_id)
                else:
                    verdict = self._other(command, bytes(buf[pos + 4 : min(end, pos + 9)]))
                if verdict is None:
                    self._ccont = False
                    break
                self._cfate = _F_STREAM if verdict is _FORWARD else _F_DROP
                if verdict is not _FORWARD:
                    if fwd < pos:
                        out(bytes(buf[fwd:pos]))
                    fwd = min(end, n)
                pos = min(end, n)
                self._cskip = end - pos
        except ProtocolError:
            self._unsent = bytes(buf[fwd:])  # what a blind forward must still send
            raise
        if fwd < pos:
            out(buf if fwd == 0 and pos == n and type(buf) is bytes else bytes(buf[fwd:pos]))
        return pos

    def _held_done(self) -> None:
        payload = bytes(self._held)
        self._held.clear()
        self._cfate = _F_STREAM
        raw = p.packet(payload, 0)
        self.reply_seq = len(payload) // p.MAX_PAYLOAD + 1  # after the command's last packet
        verdict = self._command(payload[0], payload, raw)
        self.reply_seq = 1
        if verdict is _FORWARD:
            self.to_server(raw)
        elif verdict is None:  # paused: handled again (from its bytes) on resume
            self._requeue = raw

    def _command(self, command: int, payload: bytes, raw: bytes) -> bytes | None:
        """A whole held command: _FORWARD (the caller sends ``raw``), _DROP, or None."""
        if command == p.COM_QUERY:
            return self._query(payload[1:])
        if command == p.COM_STMT_PREPARE:
            return self._prepare(payload[1:])
        if command == p.COM_INIT_DB:
            pending = Pending(SIMPLE, command)
            pending.stmts.append(("", 0.0, payload[1:].decode("utf-8", "replace")))
            self.fifo.append(pending)
            return _FORWARD
        return self._change_user(payload)

    def _command_query(self, body: bytes, raw: bytes) -> None:
        verdict = self._query(body)
        if verdict is _FORWARD:
            self.to_server(raw)
        elif verdict is None:
            self._cbuf += raw

    def _answer(self, err: bytes) -> None:
        """A refusal: written now if nothing is outstanding, else after the earlier answers."""
        if not self.fifo and self.at_boundary:
            self.to_client(err)
            return
        pending = Pending(DENIED)
        pending.synthetic = err
        self.fifo.append(pending)

    # -- handshake ---------------------------------------------------------------------------------

    def _handshake_packet(self, payload: bytes, seq: int) -> bool:
        """One client packet before authentication ended; True when it starts TLS."""
        if self.phase == GREETING:
            raise ProtocolError("client spoke before the server's greeting")
        if self.phase == AUTHENTICATING:
            self.to_server(p.header(len(payload), seq - self._shift) + payload)
            return False
        resp = p.parse_response(payload)
        if len(payload) == p.SSL_REQUEST_SIZE and resp.capabilities & p.CLIENT_SSL:
            if not self.ctx.tls or self._shift:
                raise ProtocolError("SSLRequest without TLS offered")
            self._shift = 1
            return True
        if self.ctx.tls and resp.capabilities & p.CLIENT_SSL and not self._shift:
            raise ProtocolError("CLIENT_SSL without SSLRequest")
        self.caps = resp.capabilities & ~p.CLEARED & ~p.CLIENT_SSL
        self.deprecate_eof = bool(self.caps & p.CLIENT_DEPRECATE_EOF)
        self.user = resp.user
        self.database = resp.database if resp.capabilities & p.CLIENT_CONNECT_WITH_DB else ""
        self._identify(resp.attributes.get("program_name") or self.user)
        self.phase = AUTHENTICATING
        self._auth = True
        rewritten = p.rewrite_response(payload)
        self.to_server(p.header(len(rewritten), seq - self._shift) + rewritten)
        return False

    def _identify(self, fallback: str) -> None:
        ctx = self.ctx
        identity = ctx.resolve(self.peer, fallback)
        self.app = identity.app
        self.who = ctx.who(identity)
        self.identity = identity
        self._keys.clear()
        self._dkeys.clear()
        self._plain.clear()  # allows remembered for the former user do not carry over
        self._allowed.clear()
        self.started = True
        ctx.metrics.sessions.inc(self.who)
        ctx.metrics.active.inc(self.who)

    def _end_identity(self) -> None:
        if self.started:
            self.ctx.metrics.active.inc(self.who, -1)

    def _server_handshake(self, data: bytes) -> None:
        """Greeting and authentication: whole packets (they are small), rewritten."""
        cbuf = self._sbuf
        cbuf += data
        while len(cbuf) >= 4 and self.phase != COMMANDS:
            length = int.from_bytes(cbuf[0:3], "little")
            if length == 0xFFFFFF:
                raise ProtocolError("handshake packet too long")
            if len(cbuf) < 4 + length:
                return
            seq = cbuf[3]
            payload = bytes(cbuf[4 : 4 + length])
            del cbuf[: 4 + length]
            if self.phase == GREETING:
                if payload[:1] == b"\xff":
                    self.to_client(p.header(length, seq) + payload)
                    continue
                rewritten, greeting = p.rewrite_greeting(payload, self.ctx.tls)
                self.other_strings = bool(greeting.status & p.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
                self.phase = HANDSHAKE
                self.to_client(p.header(length, seq) + rewritten)
                continue
            if self.phase == HANDSHAKE:
                raise ProtocolError("server spoke out of turn during the handshake")
            self.to_client(p.header(length, seq + self._shift) + payload)
            if payload[:1] == b"\x00":
                self.other_strings = bool(p.ok_status(payload) & p.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
                self.phase = COMMANDS
                self._auth = False
            elif payload[:1] == b"\xff":
                self.on_error(None, payload)
        if self.phase == COMMANDS and cbuf:
            rest = bytes(cbuf)
            cbuf.clear()
            self.from_server(rest)

    # -- server → client -------------------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        if self.passthrough:
            self.to_client(data)
            return
        if self.phase != COMMANDS:
            try:
                self._server_handshake(data)
            except ProtocolError as exc:
                self._decode_failed("server", exc)
            return
        try:
            due = self.scan(data)
        except ProtocolError as exc:
            self._decode_failed("server", exc)
            self.to_client(data)
            return
        if not due:
            self.to_client(data)
            return
        start = 0
        for at, err in due:
            if at > start:
                self.to_client(data[start:at])
                start = at
            self.to_client(err)
        if start < len(data):
            self.to_client(data[start:])

    def on_ok(self, head: Pending, status: int, *, end: bool) -> None:
        self.other_strings = bool(status & p.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
        if not end:
            return
        if head.kind == SIMPLE:
            db = head.stmts[0][2] if head.command == p.COM_INIT_DB and head.stmts else None
            if db is not None:
                self._set_database(db)
            return
        if head.kind == AUTH:
            return
        stmts = head.stmts
        if stmts:
            verb, sent, db = stmts.popleft()
            ctx = self.ctx
            key = self._dkeys.get(verb)
            if key is None:
                key = self._dkeys[verb] = (*self.who, verb)
            ctx.metrics.durations.observe(key, ctx.clock() - sent)
            outcome = _OUTCOMES.get(verb)
            if outcome is not None:
                ctx.metrics.transactions.inc((*self.who, outcome))
            if db is not None:
                self._set_database(db)

    def _set_database(self, db: str) -> None:
        if db != self.database:
            self.database = db
            self._keys.clear()

    def on_error(self, head: Pending | None, prefix: bytes) -> None:
        if self.started:
            state = p.err_sqlstate(prefix)
            self.ctx.metrics.errors.inc((*self.who, state[:2] or "??"))
        if head is not None:
            head.stmts.clear()
            if head.kind == AUTH:
                self.on_auth_done(head, False)

    def on_prepared(self, head: Pending, stmt_id: int) -> None:
        stmts = head.prepared
        assert isinstance(stmts, list)
        self.statements[stmt_id] = stmts
        self._allowed.pop(stmt_id, None)
        if len(self.statements) > 4096:
            del self.statements[next(iter(self.statements))]

    def on_infile(self, head: Pending) -> None:
        self._infile = True

    def on_auth_done(self, head: Pending, ok: bool) -> None:
        self._auth = False

    # -- failure and end ----------------------------------------------------------------------------

    def _decode_failed(self, side: str, exc: ProtocolError) -> None:
        ctx = self.ctx
        ctx.metrics.decode_errors.inc((ctx.listener, ctx.protocol, side))
        engine = ctx.engine
        enforcing = engine is not None and engine.enforces_on(self.app, self.user, self.database, self.identity)
        if self.phase != COMMANDS or enforcing:
            log.warning("listener %s: %s sent bytes the decoder cannot follow (%s): closing", ctx.listener, side, exc)
            self.closed = True
            self.hooks.close(f"undecodable {side} bytes: {exc}")
            return
        log.info("listener %s: %s sent bytes the decoder cannot follow (%s): forwarding blind", ctx.listener, side, exc)
        self.passthrough = True
        if side == "client":
            rest, self._unsent = self._unsent, b""
            self._cbuf.clear()
            self.to_server(rest)

    def end(self) -> None:
        """The connection is gone. A client that left in the middle of a packet (a declared
        length never sent, a header cut short) sent bytes that cannot be followed: counted."""
        if self._ended:
            return
        self._ended = True
        ctx = self.ctx
        if self.started:
            ctx.metrics.active.inc(self.who, -1)
        cut = self._cbuf or self._cskip or self._held or self._ccont
        if cut and not self.passthrough and not self.closed and not self._paused:
            ctx.metrics.decode_errors.inc((ctx.listener, ctx.protocol, "client"))
        self.closed = True
