"""What each MySQL command means for policy, the command half of
:class:`~l7.mysql_filter.MySqlSession` (the session keeps the framing, the handshake and the
server's side): a held COM_QUERY or COM_STMT_PREPARE is classified and decided, a
COM_STMT_EXECUTE is judged as what its statement id was prepared as, the other commands are
followed (their answers expected in l7/mysql_replies.py) or, unknown, treated as opaque.
Each returns what becomes of the command's bytes: :data:`_FORWARD`, :data:`_DROP` (refused,
answered by pointsman), or None (held for a rate-limit delay)."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from l7 import mysql_packets as p
from l7.model import Statement
from l7.mysql_replies import AUTH, LIST, PREPARE, RESULT, ROWS, SIMPLE, Pending
from l7.policy import SQLSTATE_RATE_LIMITED, Decision, PolicyEngine
from l7.sql_policy import OTHER, SqlPolicy, plain_allow
from l7.sql_session import PreparedStatements

if TYPE_CHECKING:
    from l7.mysql_filter import MySqlHooks

_NO_ANSWER = {p.COM_QUIT, p.COM_STMT_CLOSE, p.COM_STMT_SEND_LONG_DATA}
_SIMPLE = {p.COM_PING, p.COM_INIT_DB, p.COM_SET_OPTION, p.COM_STMT_RESET, p.COM_RESET_CONNECTION, p.COM_STATISTICS}
LAST_PREPARED = 0xFFFFFFFF  # a statement id meaning "the one prepared last"
_USE = re.compile(r"(?is)\buse\s+(`(?:[^`]|``)+`|[^\s;]+)")


class _Marker(bytes):
    pass


_FORWARD = _Marker(b"forward")
_DROP = _Marker(b"drop")


class CommandsMixin(SqlPolicy):
    """The command half of :class:`~l7.mysql_filter.MySqlSession` (its state lives there), on
    the steps both SQL filters share (l7/sql_policy.py): a refusal is an ERR packet pointsman
    answers itself, queued behind the answers to earlier commands; each counted statement waits
    for its answer in l7/mysql_replies.py (with the database it makes current, for USE)."""

    hooks: MySqlHooks
    reply_seq: int

    fifo: deque[Pending]
    caps: int
    passthrough: bool
    statements: dict[int, list[Statement]]
    _auth: bool
    _allowed: dict[int, PolicyEngine]
    _last_prepared: list[Statement] | None
    _last_denied: Decision | None

    def _identify(self, fallback: str) -> None:
        raise NotImplementedError

    def _end_identity(self) -> None:
        raise NotImplementedError

    def _answer(self, err: bytes) -> None:
        raise NotImplementedError

    def _refuse(self, d: Decision, stmts: Sequence[Statement]) -> None:
        assert d.rule is not None
        self._record_refusal(d, stmts)
        self.ctx.metrics.errors.inc((*self.who, p.SQLSTATE_ACCESS[:2]))
        limited = d.sqlstate == SQLSTATE_RATE_LIMITED
        code = p.ER_USER_LIMIT_REACHED if limited else p.ER_TABLEACCESS_DENIED
        message = d.message or f"denied by policy {d.rule!r}"
        self._answer(p.err_packet(code, p.SQLSTATE_ACCESS, message, self.reply_seq))

    def _count(self, stmts: Sequence[Statement], pending: Pending, switches: list[str | None]) -> None:
        """Count statements about to run; ``switches``: per statement, the database it makes
        current when it succeeds (empty: none changes it)."""
        ctx = self.ctx
        now = ctx.clock()
        counter = ctx.metrics.statements
        append = pending.stmts.append
        for i, st in enumerate(stmts):
            verb = st.verb
            counter.inc(self._statement_key(verb))
            append((verb, now, switches[i] if switches else None))

    def _query(self, body: bytes) -> bytes | None:
        if self._released is not None:
            stmts: Sequence[Statement] = self._pending_stmts
        else:
            stmts = self._classify(body.decode("utf-8", "replace"))
        verdict = self._judge_query(stmts)
        if verdict is None:
            return None
        d, stmts = verdict
        if d is not None and d.action == "deny":
            self._refuse(d, stmts)
            return _DROP
        pending = Pending(RESULT, p.COM_QUERY)
        switches: list[str | None] = []
        if any(st.verb == "USE" or st.verb == "DROP" for st in stmts):
            switches = self._switches(stmts, body)
        self._count(stmts, pending, switches)
        self.fifo.append(pending)
        return _FORWARD

    def _switches(self, stmts: Sequence[Statement], body: bytes) -> list[str | None]:
        """Per statement, the database the session has once it succeeds (None: unchanged):
        USE names one, DROP DATABASE of the current one leaves none."""
        uses = [_unquote(u) for u in _USE.findall(body.decode("utf-8", "replace"))]
        out: list[str | None] = []
        current = self.database
        for st in stmts:
            db: str | None = None
            if st.verb == "USE" and uses:
                db = current = uses.pop(0)
            elif (
                st.verb == "DROP"
                and st.object_kind in ("DATABASE", "SCHEMA")
                and st.name is not None
                and current
                and st.name.lower() == current.lower()
            ):
                db = current = ""
            out.append(db)
        return out

    def _prepare(self, body: bytes) -> bytes | None:
        stmts = self._classify(body.decode("utf-8", "replace"))
        d = self._decide(stmts, take_tokens=False)
        if d is not None and d.action == "deny":
            self._refuse(d, stmts)
            self._last_prepared = None
            self._last_denied = d  # an EXECUTE of "the last prepared" must not run an older one
            return _DROP
        pending = Pending(PREPARE, p.COM_STMT_PREPARE)
        pending.prepared = stmts
        self._last_prepared = stmts
        self._last_denied = None
        self.fifo.append(pending)
        return _FORWARD

    def _execute(self, command: int, stmt_id: int) -> bytes | None:
        if stmt_id == LAST_PREPARED:  # MariaDB: the statement just prepared (pipelined)
            if self._last_denied is not None:
                self._refuse(self._last_denied, [OTHER])
                return _DROP
            known = self._last_prepared
            stmt_id = -1  # never remembered as allowed: the next one may be another
        else:
            known = self.statements.get(stmt_id)
        engine = self.ctx.engine
        held = self._released is not None
        if known is not None and not held and engine is not None and self._allowed.get(stmt_id) is engine:
            d: Decision | None = None
            stmts: Sequence[Statement] = known
        else:
            verdict = self._enforced(known if known is not None else [OTHER])
            if verdict is None:
                return None
            d, stmts = verdict
            if d is not None and d.action == "deny":
                self._refuse(d, stmts)
                return _DROP
            if known is not None and stmt_id >= 0 and not held and plain_allow(engine, d):
                assert engine is not None
                self._allowed[stmt_id] = engine
        pending = Pending(RESULT, command)
        self._count(stmts, pending, [])
        self.fifo.append(pending)
        return _FORWARD

    def _other(self, command: int, head: bytes) -> bytes | None:
        """Every command but the held and by-id ones (``head``: its first bytes)."""
        if command in _NO_ANSWER:
            if command == p.COM_STMT_CLOSE and len(head) >= 5:
                stmt_id = int.from_bytes(head[1:5], "little")
                self.statements.pop(stmt_id, None)
                self._allowed.pop(stmt_id, None)
            return _FORWARD
        if command in _SIMPLE:
            if command == p.COM_RESET_CONNECTION:
                self._forget()
            self.fifo.append(Pending(SIMPLE, command))
            return _FORWARD
        if command == p.COM_FIELD_LIST or command == p.COM_STMT_FETCH:
            pending = Pending(LIST, command)
            pending.state = ROWS
            self.fifo.append(pending)
            return _FORWARD
        # Unknown: opaque to policy; its answer is followed as a query's would be.
        verdict = self._enforced([OTHER])
        if verdict is None:
            return None
        d, stmts = verdict
        if d is not None and d.action == "deny":
            self._refuse(d, stmts)
            return _DROP
        if command == p.COM_BINLOG_DUMP or command == p.COM_BINLOG_DUMP_GTID:
            self.passthrough = True  # a replication stream from now on: nothing to follow
            return _FORWARD
        self.fifo.append(Pending(RESULT, command))
        return _FORWARD

    def _change_user(self, payload: bytes) -> bytes:
        change = p.parse_change_user(payload, self.caps)
        self._end_identity()
        self.user, self.database = change.user, change.database
        self._identify(change.attributes.get("program_name") or self.user)
        self._forget()
        self._auth = True
        self.fifo.append(Pending(AUTH, p.COM_CHANGE_USER))
        return _FORWARD

    def _forget(self) -> None:
        self._last_prepared = self._last_denied = None
        self.statements.clear()
        self._allowed.clear()
        self.prepared = PreparedStatements()


def _unquote(name: str) -> str:
    if name.startswith("`") and name.endswith("`") and len(name) >= 2:
        return name[1:-1].replace("``", "`")
    return name
