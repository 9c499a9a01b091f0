"""What the PostgreSQL and MySQL session filters share between a statement's text and the
protocol's answer: classification, the engine's decision with its observations counted and
logged, a rate-limit delay holding the message (its decision taken on resume, not asked
again), the record of a refusal, and the statements counter's label keys.

How a refusal reaches the client is the protocol's own (PostgreSQL: a substitute statement
that makes the server raise the error; MySQL: an ERR packet from pointsman), as is what a
counted statement waits for; those stay in l7/pg_filter.py and l7/mysql_commands.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Protocol

from l7.model import Identity, Statement
from l7.policy import SQLSTATE_RATE_LIMITED, Decision, PolicyEngine, policy_log_line
from l7.sql_context import SqlContext
from l7.sql_session import PreparedStatements

log = logging.getLogger("pointsman.sql")
policy_log = logging.getLogger("pointsman.sql.policy")

OTHER = Statement("OTHER")
PLAIN_MAX = 256  # statements (or prepared statements) remembered per session as allowed outright


class Pausing(Protocol):
    def pause(self, seconds: float) -> None:
        """Stop reading the client and call the session's ``resume`` after ``seconds``."""


class SqlPolicy:
    """Mixed into a session filter, whose ``__init__`` sets these attributes."""

    ctx: SqlContext
    hooks: Pausing
    app: str
    user: str
    database: str
    who: tuple[str, ...]  # SqlContext.who: the label prefix of the session's series
    identity: Identity | None
    prepared: PreparedStatements
    other_strings: bool  # lex strings the dialect's other way (SqlContext.classifier_bs)
    _paused: bool
    _released: Decision | None  # a delayed message's decision, taken on resume
    _pending_stmts: Sequence[Statement]  # ... and its statements
    _keys: dict[str, tuple[str, ...]]  # verb -> statements label key
    _plain: dict[int, Statement]  # id -> a single statement allowed outright by _plain_engine
    _plain_engine: PolicyEngine | None

    def _classify(self, sql: str) -> list[Statement]:
        ctx = self.ctx
        clf = ctx.classifier_bs if self.other_strings else ctx.classifier
        try:
            return self.prepared.observe(clf.classify(sql))
        except Exception:  # a classifier bug must not take the connection down
            log.exception("listener %s: classifier failed", ctx.listener)
            return [OTHER]

    def _decide(self, stmts: Sequence[Statement], *, take_tokens: bool = True) -> Decision | None:
        """The engine's decision (which fails closed on opaque statements), its observations
        counted and logged; None without an engine."""
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
        matches = self.ctx.metrics.policy_matches
        for ob in d.observed:
            matches.inc((ob.rule, ob.action))
            st = stmts[ob.index] if ob.index < len(stmts) else OTHER
            policy_log.info(policy_log_line(ob, st, self.app, self.user, self.database))
        if d.rule is not None and (take_tokens or d.action == "deny"):
            matches.inc((d.rule, d.action))
        return d

    def _enforced(self, stmts: Sequence[Statement]) -> tuple[Decision | None, Sequence[Statement]] | None:
        """The decision for statements about to run; None while a rate-limit delay holds them
        (on resume the held decision is taken, not a new one)."""
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

    def _judge_query(self, stmts: Sequence[Statement]) -> tuple[Decision | None, Sequence[Statement]] | None:
        """``_enforced`` for a query's statements (``_pending_stmts`` when a delay is over),
        remembering plain allows: the classifier's caches hand out the same Statement for
        texts that differ only in literals, so a single statement the engine allowed outright
        (no rule, nothing observed, no time windows) is not put to it again. Held in the map,
        its id cannot be reused by another object."""
        held = self._released is not None
        engine = self.ctx.engine
        plain = self._plain
        if (
            not held
            and len(stmts) == 1
            and engine is not None
            and self._plain_engine is engine
            and plain.get(id(stmts[0])) is stmts[0]
        ):
            return None, stmts
        verdict = self._enforced(stmts)
        if verdict is None:
            return None
        d, stmts = verdict
        if not held and len(stmts) == 1 and plain_allow(engine, d):
            assert engine is not None
            if self._plain_engine is not engine or len(plain) >= PLAIN_MAX:
                plain.clear()
                self._plain_engine = engine
            plain[id(stmts[0])] = stmts[0]
        return d, stmts

    def _record_refusal(self, d: Decision, stmts: Sequence[Statement]) -> None:
        """Count a refusal and log it as a JSON line (every statement refused with it)."""
        assert d.rule is not None
        self.ctx.metrics.denied.inc((*self.who, d.rule))
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
            "decision": "rate_limited" if d.sqlstate == SQLSTATE_RATE_LIMITED else "deny",
        }
        policy_log.info(json.dumps(record, sort_keys=True, separators=(",", ":")))

    def _statement_key(self, verb: str) -> tuple[str, ...]:
        """The statements counter's key for ``verb`` in this session (cached per verb; a
        session whose database or identity changes clears ``_keys``)."""
        key = self._keys.get(verb)
        if key is None:
            key = self._keys[verb] = (*self.who, self.database, verb)
        return key


def plain_allow(engine: PolicyEngine | None, d: Decision | None) -> bool:
    """Whether ``d`` will be the engine's answer for the same statements at any time: a plain
    allow (no rule decided, nothing observed: no counter, no log line) from rules without
    time windows. A session may then remember it and skip the engine next time."""
    return (
        engine is not None
        and engine.timeless
        and d is not None
        and d.action == "allow"
        and d.rule is None
        and not d.observed
    )
