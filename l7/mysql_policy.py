"""Policy and counting for the MySQL session filter (l7/mysql_filter.py): classification
(the shared classifier, skeleton-cached), the engine's decision, refusals, and the statements counter. The
semantics are pg_filter's: ``decide_many`` over a command's statements (one denied statement
refuses them all), log/dry_run observations counted and logged as JSON lines, a rate-limit
delay holding the command (its decision is taken on resume, not asked again), a plain allow
remembered per statement shape or prepared statement id for an engine without time windows."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from l7 import mysql_packets as p
from l7.model import Identity, Statement
from l7.policy import SQLSTATE_RATE_LIMITED, Decision, PolicyEngine, policy_log_line
from l7.sql_context import SqlContext
from l7.sql_session import PreparedStatements

if TYPE_CHECKING:
    from l7.mysql_filter import MySqlHooks
    from l7.mysql_replies import Pending

log = logging.getLogger("pointsman.sql")
policy_log = logging.getLogger("pointsman.sql.policy")

OTHER = Statement("OTHER")
_PLAIN_MAX = 256


class PolicyMixin:
    """The policy half of :class:`~l7.mysql_filter.MySqlSession`."""

    ctx: SqlContext
    hooks: MySqlHooks
    app: str
    user: str
    database: str
    who: tuple[str, ...]
    identity: Identity | None
    no_backslash: bool
    prepared: PreparedStatements
    _paused: bool
    _released: Decision | None
    _pending_stmts: Sequence[Statement]
    _keys: dict[str, tuple[str, ...]]
    reply_seq: int

    def _answer(self, err: bytes) -> None:
        raise NotImplementedError

    def _classify(self, sql: str) -> list[Statement]:
        ctx = self.ctx
        clf = ctx.classifier_bs if self.no_backslash else ctx.classifier
        try:
            return self.prepared.observe(clf.classify(sql))
        except Exception:  # a classifier bug must not take the connection down
            log.exception("listener %s: classifier failed", ctx.listener)
            return [OTHER]

    def _decide(self, stmts: Sequence[Statement], *, take_tokens: bool = True) -> Decision | None:
        """The engine's decision (which fails closed on opaque statements), its observations
        counted and logged."""
        engine = self.ctx.engine
        if engine is None or not stmts:
            return None
        d = engine.decide_many(
            stmts,
            self.app,
            self.user,
            self.database,
            self.ctx.wallclock(),
            take_tokens=take_tokens,
            source=self.identity,
        )
        if d.observed:
            matches = self.ctx.metrics.policy_matches
            for ob in d.observed:
                matches.inc((ob.rule, ob.action))
                st = stmts[ob.index] if ob.index < len(stmts) else OTHER
                policy_log.info(policy_log_line(ob, st, self.app, self.user, self.database))
        if d.rule is not None and (take_tokens or d.action == "deny"):
            self.ctx.metrics.policy_matches.inc((d.rule, d.action))
        return d

    def _enforced(self, stmts: Sequence[Statement]) -> tuple[Decision | None, Sequence[Statement]] | None:
        if self._released is not None:
            held, self._released = self._released, None
            return held, self._pending_stmts
        d = self._decide(stmts)
        if d is not None and d.action == "delay":
            self._pending_stmts = stmts
            self._released = d
            self.ctx.metrics.delayed.inc((*self.who, d.rule or ""))
            self._paused = True
            self.hooks.pause(d.delay)
            return None
        return d, stmts

    def _refuse(self, d: Decision, stmts: Sequence[Statement]) -> None:
        ctx = self.ctx
        assert d.rule is not None
        limited = d.sqlstate == SQLSTATE_RATE_LIMITED
        ctx.metrics.denied.inc((*self.who, d.rule))
        ctx.metrics.errors.inc((*self.who, p.SQLSTATE_ACCESS[:2]))
        record = {
            "app": self.app,
            "version": self.who[3],
            "instance": self.who[4],
            "node": self.who[5],
            "user": self.user,
            "database": self.database,
            "verbs": [st.verb for st in stmts],
            "tables": sorted({t for st in stmts for t in st.tables}),
            "rule": d.rule,
            "decision": "rate_limited" if limited else "deny",
        }
        policy_log.info(json.dumps(record, sort_keys=True, separators=(",", ":")))
        code = p.ER_USER_LIMIT_REACHED if limited else p.ER_TABLEACCESS_DENIED
        message = d.message or f"denied by policy {d.rule!r}"
        self._answer(p.err_packet(code, p.SQLSTATE_ACCESS, message, self.reply_seq))

    def _count(self, stmts: Sequence[Statement], pending: Pending, switches: list[str | None]) -> None:
        """Count statements about to run; ``switches``: per statement, the database it makes
        current when it succeeds (empty: none changes it)."""
        ctx = self.ctx
        now = ctx.clock()
        keys = self._keys
        counter = ctx.metrics.statements
        append = pending.stmts.append
        for i, st in enumerate(stmts):
            verb = st.verb
            key = keys.get(verb)
            if key is None:
                key = keys[verb] = (*self.who, self.database, verb)
            counter.inc(key)
            append((verb, now, switches[i] if switches else None))


def _unquote(name: str) -> str:
    if name.startswith("`") and name.endswith("`") and len(name) >= 2:
        return name[1:-1].replace("``", "`")
    return name


def _plain_allow(engine: PolicyEngine | None, d: Decision | None) -> bool:
    """An allow that the engine will give again for the same statements (see pg_filter)."""
    return (
        engine is not None
        and engine.timeless
        and d is not None
        and d.action == "allow"
        and d.rule is None
        and not d.observed
    )
