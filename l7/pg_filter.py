"""The PostgreSQL session filter: decoder events in, counting and policy out. Sans-IO.

One :class:`PgSession` per client connection. The proxy around it (router/pg_proxy.py) hands
it the bytes each side sends (:meth:`PgSession.from_client`, :meth:`PgSession.from_server`)
and gives it two writers (towards the server, towards the client) and a few hooks
(:class:`PgHooks`: open the upstream, start TLS, forward a cancel, pause for a rate limit,
close). Nothing here touches sockets or the event loop, so a test can drive a session with
byte strings.

Forwarding: bytes go on unchanged, as they arrived, except whole messages that policy
removes. A message whose verdict is needed (Query, Parse, Execute) is held until it is
complete and decided; everything else flows at once (:class:`~l7.pg_splice.Splicer`).

Denying without desynchronising client and server. The client must see exactly what a
server-side error would have produced, and the server's transaction state must match what
the client believes. So a denied statement is not answered by the proxy; it is *replaced*
by one that makes the server raise the error itself::

    DO $pointsman$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '...'; END$pointsman$

- Simple query: the whole ``Q`` (every statement in it: a multi-statement string runs as one
  unit) is replaced by that ``DO``. The server answers ErrorResponse + ReadyForQuery; inside a
  transaction block the transaction is now aborted on the server, as the client expects.
- Extended query: a denied Parse (or an Execute whose statement is denied now) is replaced
  by Parse/Bind/Execute of that ``DO`` (unnamed statement and portal), and the client's
  messages up to its Sync are dropped, as a server skips them after an error. The server's
  ParseComplete and BindComplete for the substitute are removed from its answer: they are
  the k-th ParseComplete and j-th BindComplete of that Sync group, k and j counted when the
  substitute was sent. If an earlier message of the group failed, the server skips the
  substitute too and nothing needs removing.

Response accounting: each Query, and each run of extended messages up to a Sync, is a
:class:`_Unit` in a FIFO that the server's answers consume in order; ReadyForQuery ends the
head unit. A unit lists the statements it sent (verb and send time), so CommandComplete
gives the statement's latency.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence

from l7 import pg_messages as m
from l7.errors import ProtocolError
from l7.model import Identity, Statement
from l7.pg_decoder import PgBackendDecoder, PgFrontendDecoder, report
from l7.pg_refusal import extended_substitute, raise_statement, simple_substitute
from l7.pg_scan import HEADER, STATUS, scan_client, scan_server
from l7.pg_splice import Splicer
from l7.policy import Decision, PolicyEngine
from l7.sql_context import PgHooks, SqlContext
from l7.sql_policy import OTHER, SqlPolicy, plain_allow
from l7.sql_session import PreparedStatements

log = logging.getLogger("pointsman.sql")
policy_log = logging.getLogger("pointsman.sql.policy")


class _Unit:
    """The server's answer to one Query, or to extended messages up to a Sync."""

    __slots__ = ("binds", "cuts", "errored", "parses", "refusal", "seen_binds", "seen_parses", "stmts", "suppress")

    def __init__(self) -> None:
        self.stmts: deque[tuple[str, float]] = deque()  # (verb, sent at), in order
        self.parses = 0  # Parse messages sent to the server in this unit
        self.binds = 0
        self.seen_parses = 0  # ParseComplete / BindComplete received
        self.seen_binds = 0
        self.suppress: list[tuple[int, int]] = []  # (k-th ParseComplete, j-th BindComplete) to drop
        self.errored = False
        self.cuts = False  # a substitute was sent: the answer goes through the splicer
        self.refusal: str | None = None  # the message our substitute raises (its error is tidied)


class PgSession(SqlPolicy):
    """One client connection's view of the protocol: identity, statements, policy."""

    hooks: PgHooks

    def __init__(
        self,
        context: Callable[[], SqlContext],
        to_server: Callable[[bytes], object],
        to_client: Callable[[bytes], object],
        hooks: PgHooks,
        peer: str = "",
    ) -> None:
        self._context = context
        self.peer = peer  # the client's address, for placement-derived identity
        self.ctx = context()
        self.to_server = to_server
        self.to_client = to_client
        self.hooks = hooks
        self._fdec = PgFrontendDecoder()
        self._bdec = PgBackendDecoder()
        self._bdec.report_raw = False  # rows and row descriptions only pass through
        self._out = Splicer(to_server)  # client -> server
        self._back = Splicer(to_client)  # server -> client, used only while cutting
        self._queue: deque[tuple[m.PgMessage, int]] = deque()  # decoded, not yet handled
        self._paused = False  # waiting for a rate-limit delay
        self._released: Decision | None = None  # the delayed message's decision, on resume
        self._passthrough = False
        self._closed = False
        self.started = False  # the startup packet was seen
        self.ready = False  # the first ReadyForQuery was seen
        self.user = ""
        self.database = ""
        self.app = ""
        self.who: tuple[str, ...] = ()  # label prefix of this session's series (SqlContext.who)
        self.identity: Identity | None = None  # known once the startup packet is read
        self.status = "I"  # transaction status from the last ReadyForQuery
        self.prepared = PreparedStatements()  # SQL PREPARE and protocol Parse names
        self._portals: dict[str, str] = {}  # portal -> statement name
        self._parsed: dict[str, list[Statement]] = {}  # protocol statement -> classification
        self._units: deque[_Unit] = deque()
        self._open: _Unit | None = None  # extended messages since the last Sync
        self._discard = False  # dropping client messages until Sync (after a deny)
        self._cutting = 0  # units in the FIFO whose answers may need cutting
        self.other_strings = False  # standard_conforming_strings = off
        self._keys: dict[str, tuple[str, ...]] = {}  # verb -> statements label key
        self._dkeys: dict[str, tuple[str, ...]] = {}  # verb -> durations label key
        # protocol statement -> the engine that allowed it outright (no rule, nothing observed,
        # no time windows): its next Execute is counted without asking the engine again
        self._allowed: dict[str, PolicyEngine] = {}
        # the same for simple queries: id -> Statement allowed outright by _plain_engine
        self._plain: dict[int, Statement] = {}
        self._plain_engine: PolicyEngine | None = None
        self._pending_stmts: Sequence[Statement] = ()  # of the message held for a delay
        self._ended = False

    # -- client → server ---------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._passthrough:
            self.to_server(data)
            return
        out, fdec = self._out, self._fdec
        pos = 0
        if (
            type(data) is bytes
            and not self._queue
            and not self._paused
            and not self._closed
            and out.start == out.received
            and not self._discard
            and self._released is None
            and fdec.idle
        ):
            if data[0] == 81 and self._fast_query(data):  # "Q"
                return
            pos, ops = self._scan_client(data)
            if pos == len(data):
                self._apply_client(ops)
                fdec.advance(pos)
                out.skip(pos)
                self.to_server(data)
                return
            if pos:
                fdec.advance(pos)
        out.add(data)
        try:
            events = fdec.feed(data[pos:] if pos else data)
        except ProtocolError as exc:
            self._decode_failed("client", exc)  # what the fast path read is not applied either
            return
        forward = 0
        if pos:
            # The fast path stopped at a message the general one must judge: what it read is
            # applied now and goes on with the next write.
            self._apply_client(ops)
            forward = out.start + pos
        if events:
            self._queue.extend(zip(events, self._fdec.ends, strict=True))
        self._pump(forward)

    def resume(self) -> None:
        """The rate-limit delay is over: send the held statement, go on with the rest."""
        self._paused = False
        if not self._closed:
            self._pump()

    def _pump(self, forward: int = 0) -> None:
        queue, out = self._queue, self._out
        self.ctx = self._context()
        # Messages that go on unchanged are written together, in one write, when something
        # else (a drop, a replacement, a pause) or the end of what arrived comes: a pipelined
        # Bind/Execute/Sync is one send, not three. ``forward``: where such a run already ends.
        while queue and not self._paused:
            event, end = queue[0]
            verdict = self._client_event(event, end)
            if verdict is None:  # pause (or close): the message stays at the head
                break
            queue.popleft()
            if verdict is _FORWARD:
                forward = end
                continue
            if forward:
                out.forward_to(forward)
                forward = 0
            out.drop_to(end)
            if verdict is not _DROP:  # a replacement
                self.to_server(verdict)
            if self._closed:
                return
        if self._paused or self._closed or queue:
            if forward and not self._closed:
                out.forward_to(forward)
            return
        partial = self._fdec.partial_start
        out.forward_to(out.received if partial is None else partial)

    def _fast_query(self, data: bytes) -> bool:
        """A chunk that is exactly one whole Query, checked as the decoder would, decided as
        :meth:`_pump` would; False (nothing done) for anything else."""
        if len(data) < 6:
            return False
        _, length = HEADER.unpack_from(data)
        n = len(data)
        if length + 1 != n or length > self._fdec.max_message_size or data.find(b"\0", 5) != n - 1:
            return False
        self.ctx = self._context()
        fdec, out = self._fdec, self._out
        text = data[5:-1].decode("utf-8", "replace")
        verdict = self._query(text)
        fdec.advance(n)
        if verdict is None:  # held for a delay: queued as the general path would
            out.add(data)
            self._queue.append((m.Query(text), fdec.offset))
            return True
        out.skip(n)
        self.to_server(data if verdict is _FORWARD else verdict)
        return True

    def _scan_client(self, data: bytes) -> tuple[int, list[tuple[int, str, str]]]:
        """The fast run at the start of the chunk (see `pg_scan.scan_client`), judged against
        this session's statements and the current policy engine."""
        self.ctx = ctx = self._context()
        return scan_client(data, ctx.engine, self._portals, self._parsed, self._allowed)

    def _apply_client(self, ops: list[tuple[int, str, str]]) -> None:
        portals, parsed = self._portals, self._parsed
        for kind, a, b in ops:
            unit = self._unit()
            if kind == 66:  # Bind
                unit.binds += 1
                portals[a] = b
            elif kind == 69:  # Execute: allowed before, counted
                self._count(parsed[a], unit)
            elif kind == 83:  # Sync (Describe and Flush only open the unit)
                self._open = None

    def _client_event(self, ev: m.PgMessage, end: int) -> bytes | None:
        """The fate of one client message: _FORWARD, _DROP, replacement bytes, or None to
        stop here (paused for a delay, or closed)."""
        if self._discard:
            if isinstance(ev, m.Sync):
                self._discard = False
                self._open = None
                return _FORWARD
            return _FORWARD if isinstance(ev, m.Flush) else _DROP
        cls = type(ev)
        if cls is m.Query:
            return self._query(ev.text)  # type: ignore[attr-defined]
        if cls is m.Bind:
            unit = self._unit()
            unit.binds += 1
            self._portals[ev.portal] = ev.statement  # type: ignore[attr-defined]
            return _FORWARD
        if cls is m.Execute:
            return self._execute(ev)  # type: ignore[arg-type]
        if cls is m.Parse:
            return self._parse(ev)  # type: ignore[arg-type]
        if cls is m.Sync:
            self._unit()
            self._open = None
            return _FORWARD
        if cls is m.Describe or cls is m.Flush:
            self._unit()
            return _FORWARD
        if cls is m.Close:
            self._unit()
            if ev.kind == "S":  # type: ignore[attr-defined]
                self._parsed.pop(ev.name, None)  # type: ignore[attr-defined]
                self._allowed.pop(ev.name, None)  # type: ignore[attr-defined]
            else:
                self._portals.pop(ev.name, None)  # type: ignore[attr-defined]
            return _FORWARD
        if cls is m.RawMessage:
            if ev.type == "F":  # type: ignore[attr-defined]  # FunctionCall: answered, then ReadyForQuery
                self._open = None
                self._units.append(_Unit())
            return _FORWARD
        return self._startup_event(ev, end)

    def _startup_event(self, ev: m.PgMessage, end: int) -> bytes | None:
        if isinstance(ev, m.StartupMessage):
            params = ev.params
            self.user = params.get("user", "")
            self.database = params.get("database", self.user)
            # Identity: the listener's (a sidecar's), the instance owning the client address
            # (placement), the client's application_name, its user - most trusted first.
            ctx = self.ctx
            identity = ctx.resolve(self.peer, params.get("application_name") or self.user)
            self.app = identity.app
            self.who = ctx.who(identity)
            self.identity = identity
            self.started = True
            ctx.metrics.sessions.inc(self.who)
            ctx.metrics.active.inc(self.who)
            self.hooks.connect_upstream()
            return _FORWARD
        if isinstance(ev, m.SSLRequest):
            if end != self._out.received:
                # Bytes after an SSLRequest would be read in clear although the client
                # believes they are encrypted (CVE-2021-23214): refuse.
                self._decode_failed("client", ProtocolError("data after SSLRequest"))
                return None
            if self.ctx.tls:
                self.to_client(b"S")
                self.hooks.start_tls()
            else:
                self.to_client(b"N")
            return _DROP
        if isinstance(ev, m.GSSENCRequest):
            self.to_client(b"N")  # no GSSAPI encryption: the client goes on in clear or asks for SSL
            return _DROP
        if isinstance(ev, m.CancelRequest):
            raw = (16).to_bytes(4, "big") + (80877102).to_bytes(4, "big") + ev.pid.to_bytes(4, "big", signed=True)
            self.hooks.cancel(ev.pid, ev.secret, raw + ev.secret)
            self._closed = True
            return _DROP
        return _FORWARD  # Terminate, CopyDone, CopyFail, and raw bodies (CopyData, passwords)

    def _unit(self) -> _Unit:
        unit = self._open
        if unit is None:
            unit = self._open = _Unit()
            self._units.append(unit)
        return unit

    def _refuse(self, d: Decision, unit: _Unit, stmts: Sequence[Statement]) -> str:
        """Count a refusal; the SQL that makes the server raise it in ``unit``."""
        assert d.rule is not None
        if not unit.cuts:
            unit.cuts = True
            self._cutting += 1
        self._record_refusal(d, stmts)
        sql, unit.refusal = raise_statement(d.sqlstate or "42501", d.message or f"denied by policy {d.rule!r}")
        return sql

    def _count(self, stmts: Sequence[Statement], unit: _Unit) -> None:
        ctx = self.ctx
        now = ctx.clock()
        counter = ctx.metrics.statements
        for st in stmts:
            verb = st.verb
            counter.inc(self._statement_key(verb))
            unit.stmts.append((verb, now))

    def _query(self, text: str) -> bytes | None:
        self._open = None  # a Query ends any extended run (the server would process it)
        stmts = self._pending_stmts if self._released is not None else self._classify(text)
        verdict = self._judge_query(stmts)
        if verdict is None:
            return None
        d, stmts = verdict
        unit = _Unit()
        self._units.append(unit)
        if d is not None and d.action == "deny":
            return simple_substitute(self._refuse(d, unit, stmts))
        self._count(stmts, unit)
        return _FORWARD

    def _parse(self, ev: m.Parse) -> bytes | None:
        unit = self._unit()
        stmts = self._classify(ev.query)
        d = self._decide(stmts, take_tokens=False)
        if d is not None and d.action == "deny":
            return self._substitute(unit, d, stmts)
        self._parsed[ev.statement] = stmts
        self._allowed.pop(ev.statement, None)
        unit.parses += 1
        return _FORWARD

    def _execute(self, ev: m.Execute) -> bytes | None:
        unit = self._unit()
        name = self._portals.get(ev.portal, "")
        parsed = self._parsed.get(name)
        held = self._released is not None
        verdict = self._enforced(parsed if parsed is not None else [OTHER])
        if verdict is None:
            return None
        d, stmts = verdict
        if d is not None and d.action == "deny":
            return self._substitute(unit, d, stmts)
        engine = self.ctx.engine
        if parsed is not None and not held and plain_allow(engine, d):
            assert engine is not None
            self._allowed[name] = engine  # the same answer every time: ask once
        self._count(stmts, unit)
        return _FORWARD

    def _substitute(self, unit: _Unit, d: Decision, stmts: Sequence[Statement]) -> bytes:
        unit.suppress.append((unit.parses + 1, unit.binds + 1))
        unit.parses += 1
        unit.binds += 1
        self._discard = True
        return extended_substitute(self._refuse(d, unit, stmts))

    # -- server → client -----------------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        if self._passthrough:
            self.to_client(data)
            return
        bdec = self._bdec
        pos = 0
        if not self._cutting and not self._back.pending and type(data) is bytes and bdec.idle:
            pos = scan_server(data)
            if pos == len(data):
                self._apply_server(data, pos)
                bdec.advance(pos)
                self._back.skip(pos)
                self.to_client(data)
                return
            if pos:
                bdec.advance(pos)
        try:
            events = bdec.feed(data[pos:] if pos else data)
        except ProtocolError as exc:
            self._decode_failed("server", exc)  # what the fast path read is not applied either
            self.to_client(data)
            return
        if pos:
            self._apply_server(data, pos)  # in order: before the events of the rest
        back = self._back
        if not self._cutting and not back.pending:
            for ev in events:
                self._server_event(ev)
            back.skip(len(data))
            self.to_client(data)
            return
        back.add(data)
        for ev, end in zip(events, self._bdec.ends, strict=True):
            fate = self._server_event(ev)
            if fate is False:
                back.forward_to(end)
            else:
                back.drop_to(end)
                if fate is not True:
                    self.to_client(fate)
        partial = self._bdec.partial_start
        back.forward_to(back.received if partial is None or not self._cutting else partial)

    def _apply_server(self, data: bytes, end: int) -> None:
        """Account for the messages :meth:`_scan_server` found in ``data[:end]``, as
        :meth:`_server_event` would."""
        pos = 0
        unpack = HEADER.unpack_from
        units = self._units
        while pos < end:
            kind, length = unpack(data, pos)
            stop = pos + 1 + length
            if kind == 67:  # CommandComplete
                self._command_complete(_OUTCOMES.get(data[pos + 5 : stop - 1]))
            elif kind == 90:  # ReadyForQuery
                self._ready_for_query(STATUS[data[pos + 5]])
            elif (kind == 50 or kind == 49) and units:  # nothing is being cut: only counted
                if kind == 50:
                    units[0].seen_binds += 1
                else:
                    units[0].seen_parses += 1
            pos = stop

    def _command_complete(self, outcome: str | None) -> None:
        """A statement's answer is complete: its latency, and a transaction's end (`outcome`)."""
        units = self._units
        ctx = self.ctx
        if units and units[0].stmts:
            verb, sent = units[0].stmts.popleft()
            key = self._dkeys.get(verb)
            if key is None:
                key = self._dkeys[verb] = (*self.who, verb)
            ctx.metrics.durations.observe(key, ctx.clock() - sent)
        if outcome is not None:
            ctx.metrics.transactions.inc((*self.who, outcome))

    def _ready_for_query(self, status: str) -> None:
        """The server is ready: the transaction status, and the end of the oldest unit."""
        self.status = status
        units = self._units
        if not self.ready:
            self.ready = True
        elif units:
            unit = units.popleft()
            if unit.cuts:
                self._cutting -= 1

    def _server_event(self, ev: m.PgMessage) -> bool | bytes:
        """Account for one server message. False: it goes to the client as it is; True: it
        is dropped; bytes: what the client gets instead."""
        cls = type(ev)
        if cls is m.RawMessage:
            return False
        units = self._units
        if cls is m.CommandComplete:
            self._command_complete(_OUTCOMES.get(ev.tag))  # type: ignore[attr-defined]
            return False
        if cls is m.ReadyForQuery:
            self._ready_for_query(ev.status)  # type: ignore[attr-defined]
            return False
        if cls is m.ParseComplete or cls is m.BindComplete:
            if not units:
                return False
            unit = units[0]
            if cls is m.ParseComplete:
                unit.seen_parses += 1
                return bool(unit.suppress) and unit.seen_parses == unit.suppress[0][0]
            unit.seen_binds += 1
            if unit.suppress and unit.seen_binds == unit.suppress[0][1]:
                unit.suppress.pop(0)
                return True
            return False
        if cls is m.ErrorResponse:
            code = ev.code  # type: ignore[attr-defined]
            self.ctx.metrics.errors.inc((*self.who, code[:2] or "??"))
            if units:
                unit = units[0]
                unit.stmts.clear()  # the rest of the unit does not run
                unit.suppress.clear()
                unit.errored = True
                if unit.refusal is not None and ev.message == unit.refusal:  # type: ignore[attr-defined]
                    # Our substitute's error: without the PL/pgSQL context (CONTEXT: ... at
                    # RAISE) and source location, which describe the mechanism, not the refusal.
                    kept = [(k, v) for k, v in ev.fields if k in "SVCM"]  # type: ignore[attr-defined]
                    return report(b"E", kept)
            return False
        if cls is m.EmptyQueryResponse or cls is m.PortalSuspended:
            if units and units[0].stmts:
                units[0].stmts.popleft()
            return False
        if cls is m.ParameterStatus:
            if ev.name == "standard_conforming_strings":  # type: ignore[attr-defined]
                self.other_strings = ev.value == "off"  # type: ignore[attr-defined]
            return False
        if cls is m.BackendKeyData:
            self.hooks.backend_key(ev.pid, ev.secret)  # type: ignore[attr-defined]
        return False

    # -- failure and end -----------------------------------------------------------------------

    def _decode_failed(self, side: str, exc: ProtocolError) -> None:
        ctx = self.ctx
        ctx.metrics.decode_errors.inc((ctx.listener, ctx.protocol, side))
        engine = ctx.engine
        if not self.started or (
            engine is not None and engine.enforces_on(self.app, self.user, self.database, self.identity)
        ):
            log.warning("listener %s: %s sent bytes the decoder cannot follow (%s): closing", ctx.listener, side, exc)
            self._closed = True
            self.hooks.close(f"undecodable {side} bytes: {exc}")
            return
        log.info("listener %s: %s sent bytes the decoder cannot follow (%s): forwarding blind", ctx.listener, side, exc)
        self._passthrough = True
        self._queue.clear()
        self._out.forward_all()
        self._back.forward_all()

    def end(self) -> None:
        """The connection is gone."""
        if self.started and not self._ended:
            self._ended = True
            self.ctx.metrics.active.inc(self.who, -1)
        self._closed = True


# CommandComplete tags that end a transaction, as decoded text and as raw bytes (fast path).
_OUTCOMES: dict[str | bytes, str] = {
    "COMMIT": "committed",
    "ROLLBACK": "rolled_back",
    b"COMMIT": "committed",
    b"ROLLBACK": "rolled_back",
}


class _Marker(bytes):
    pass


_FORWARD = _Marker(b"forward")
_DROP = _Marker(b"drop")
