"""The SQL policy engine: classified statements in, a decision out. Pure: no sockets, no
asyncio, no clock of its own (``now`` is passed in, unix seconds).

Evaluation (:meth:`PolicyEngine.decide`): rules in config order; a rule applies when its
``match`` holds and, if given, ``when`` contains ``now``.

- ``log`` / ``dry_run`` rules never change the outcome; every one that applies is reported in
  :attr:`Decision.observed` (for counting and the JSON log line), wherever it stands in the
  list: a watch rule placed after a deny still sees the denied statement, and a ``dry_run``
  rehearsal is counted whatever an earlier rule decided.
- The first applying enforcing rule decides (later enforcing rules are not consulted): ``allow`` -> allow,
  ``deny`` -> deny with SQLSTATE 42501 (insufficient_privilege) and a message naming the rule,
  ``rate_limit`` -> takes a token from the (rule, app) bucket: allow if one is there; otherwise
  ``over: deny`` -> deny 53400 (configuration_limit_exceeded); ``over: delay`` -> delay by the
  time until the token is due (the token is reserved, so the next caller waits longer), or
  deny 53400 when that wait exceeds ``max_delay``. A refused statement takes no token.
- No rule applies -> allow (the engine is an allow-list only if the config ends with a
  catch-all ``deny``).

Matching a :class:`~l7.model.Statement`: ``verbs`` matches if any verb the statement performs
(``verb`` and ``verbs``: ``WITH d AS (DELETE ...) INSERT`` is both DELETE and INSERT) is
listed. ``tables`` matches if any table matches any glob, tried against the name as classified
(``public.audit_log``) and its last part (``audit_log``): ``audit_*`` matches both,
``public.*`` only names written with their schema (the search_path is not known here).
Globs are case-insensitive, also for apps, users and databases.

Opaque statements: an unrecognised statement is verb ``OTHER`` with no tables; an ``EXECUTE``
of a name this connection never prepared stays verb ``EXECUTE`` with no ``inner`` and no
tables. A rule listing verbs matches them only if it lists ``OTHER`` / ``EXECUTE``; a rule
with ``tables`` never matches them. So a deny rule on ``DELETE`` does not stop an opaque
statement that might be a DELETE. So :meth:`PolicyEngine.decide_many` (what the session
filters call) fails closed: when some deny or rate-limit rule can apply to the session (its
identity matches, whatever the verbs), an opaque statement is refused, in that rule's name, as
undecodable bytes are; a session no enforcing rule covers is only counted. :meth:`decide`
(one statement, used by tests and tools) keeps the plain rule semantics.

Token buckets are kept per (rule name, app) and refilled from ``now``; a clock going
backwards refills nothing. The app name comes from the client (``application_name``), so
keys are unbounded: :meth:`PolicyEngine.prune` drops buckets that have refilled completely
(indistinguishable from new ones).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import translate
from typing import Literal

from l7.model import Identity, Statement
from l7.policy_config import PolicyConfig, PolicyRule, RateLimitAction

SQLSTATE_DENIED = "42501"  # insufficient_privilege
SQLSTATE_RATE_LIMITED = "53400"  # configuration_limit_exceeded

DecisionAction = Literal["allow", "deny", "delay"]


@dataclass(frozen=True, slots=True)
class Observation:
    """A log / dry_run rule that applied. ``index``: the statement's position (decide_many)."""

    rule: str
    action: Literal["log", "dry_run"]
    index: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a statement (or a multi-statement string).

    ``rule`` is the rule that decided (None when no enforcing rule applied). ``sqlstate`` and
    ``message`` are set for deny; ``delay`` (seconds) for delay. ``observed`` lists the
    non-enforcing rules that applied, in order.
    """

    action: DecisionAction
    rule: str | None = None
    sqlstate: str | None = None
    message: str | None = None
    delay: float = 0.0
    observed: tuple[Observation, ...] = ()


ALLOW = Decision("allow")


def is_opaque(statement: Statement) -> bool:
    """True when the engine cannot know what ``statement`` does: verb OTHER, or an EXECUTE
    whose prepared statement is unknown. A fail-closed filter refuses these itself."""
    return statement.verb == "OTHER" or (statement.verb == "EXECUTE" and statement.inner is None)


def _glob_re(patterns: tuple[str, ...] | None) -> re.Pattern[str] | None:
    if patterns is None:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _Rule:
    """A configured rule with its globs compiled once."""

    __slots__ = ("apps", "config", "databases", "name", "source", "tables", "users", "verbs")

    def __init__(self, config: PolicyRule) -> None:
        self.config = config
        self.name = config.name
        m = config.match
        self.verbs = frozenset(m.verbs) if m.verbs is not None else None
        self.apps = _glob_re(m.apps)
        self.users = _glob_re(m.users)
        self.databases = _glob_re(m.databases)
        self.tables = _glob_re(m.tables)
        # version, instance, node: matched against the session's Identity (None: no such keys)
        patterns = (_glob_re(m.versions), _glob_re(m.instances), _glob_re(m.nodes))
        self.source = patterns if any(p is not None for p in patterns) else None

    def identity_matches(self, app: str, user: str, database: str, source: Identity | None) -> bool:
        for pattern, value in ((self.apps, app), (self.users, user), (self.databases, database)):
            if pattern is not None and not pattern.match(value.lower()):
                return False
        if self.source is not None:
            values = (source.version, source.instance, source.node) if source is not None else ("", "", "")
            for pattern, value in zip(self.source, values, strict=True):
                if pattern is not None and not pattern.match(value.lower()):
                    return False
        return True

    def applies(self, st: Statement, app: str, user: str, database: str, now: float, source: Identity | None) -> bool:
        if self.verbs is not None and st.verb not in self.verbs and self.verbs.isdisjoint(st.verbs):
            return False
        if not self.identity_matches(app, user, database, source):
            return False
        if self.tables is not None and not any(_table_matches(self.tables, t) for t in st.tables):
            return False
        when = self.config.when
        return when is None or when.contains(now)


def _refuses(rule: PolicyRule) -> bool:
    return rule.action not in ("log", "dry_run", "allow")


def _table_matches(pattern: re.Pattern[str], table: str) -> bool:
    name = table.lower()
    return bool(pattern.match(name) or ("." in name and pattern.match(name.rpartition(".")[2])))


_Journal = dict[tuple[str, str], tuple[float, float] | None]


class PolicyEngine:
    """Ordered SQL policy rules plus their token buckets. One per listener; not thread-safe
    (it runs on one event loop)."""

    def __init__(self, policies: PolicyConfig | Iterable[PolicyRule]) -> None:
        rules = policies.policies if isinstance(policies, PolicyConfig) else tuple(policies)
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("policy names must be unique")
        self._rules = tuple(_Rule(r) for r in rules)
        self.enforcing = any(_refuses(r) for r in rules)  # some rule can refuse or hold a statement
        # No rule has a time window: a plain allow (no rule, nothing observed) for given
        # statements and identity is the same at any time, so a session may remember it.
        self.timeless = all(r.when is None for r in rules)
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def decide(
        self, statement: Statement, app: str, user: str, database: str, now: float, *, source: Identity | None = None
    ) -> Decision:
        """The decision for one statement at unix time ``now`` (rate-limit tokens are taken).
        ``source``: the session's whole identity, for rules matching versions, instances or
        nodes (without it those match as empty strings)."""
        return self._decide(statement, app, user, database, now, 0, None, source=source)

    def decide_many(
        self,
        statements: Sequence[Statement],
        app: str,
        user: str,
        database: str,
        now: float,
        *,
        take_tokens: bool = True,
        source: Identity | None = None,
    ) -> Decision:
        """One decision for a multi-statement string: the server runs it as one unit, so if
        any statement is denied none runs. The result is the first deny (evaluation stops
        there; tokens taken by earlier statements are given back); otherwise delay by the
        longest delay (buckets are reserved, so later statements' delays already include the
        earlier ones'); otherwise allow. ``rule`` is the denying / longest-delaying rule, or
        for allow the first deciding rule. ``observed`` covers every statement evaluated,
        with its ``index``.

        ``take_tokens=False`` asks only whether the statements are denied outright: a rate
        limit that applies allows without touching its bucket (the extended protocol checks at
        Parse, and takes the token at each Execute)."""
        journal: _Journal = {}
        observed: list[Observation] = []
        result: Decision | None = None
        for i, st in enumerate(statements):
            d = self._decide(st, app, user, database, now, i, journal if take_tokens else None, take_tokens, source)
            observed.extend(d.observed)
            if d.action == "deny":
                self._rollback(journal)
                return _with_observed(d, observed)
            if result is None or _outranks(d, result):
                result = d
        if any(is_opaque(st) for st in statements):
            rule = self._enforcing_rule(app, user, database, source)
            if rule is not None:  # fail closed: what it does cannot be known here
                self._rollback(journal)
                message = f"statement denied by policy {rule!r}: what it does cannot be known"
                return Decision("deny", rule, SQLSTATE_DENIED, message, observed=tuple(observed))
        return _with_observed(result or ALLOW, observed)

    def prune(self, now: float) -> int:
        """Forget buckets that are full again at ``now``; returns how many were dropped."""
        rates = {r.name: r.config.action for r in self._rules}
        drop = []
        for key, bucket in self._buckets.items():
            action = rates.get(key[0])
            if not isinstance(action, RateLimitAction):
                drop.append(key)
                continue
            burst = float(action.burst or 1)
            if bucket.tokens + max(0.0, now - bucket.stamp) * action.rate_limit >= burst:
                drop.append(key)
        for key in drop:
            del self._buckets[key]
        return len(drop)

    def __len__(self) -> int:
        return len(self._rules)

    def enforces_on(self, app: str, user: str, database: str, source: Identity | None = None) -> bool:
        """Whether some deny or rate-limit rule can apply to a session with this identity
        (whatever its statements and the time): such a session must fail closed."""
        return self._enforcing_rule(app, user, database, source) is not None

    def _enforcing_rule(self, app: str, user: str, database: str, source: Identity | None) -> str | None:
        """The first deny or rate-limit rule that can apply to a session with this identity."""
        for rule in self._rules:
            if _refuses(rule.config) and rule.identity_matches(app, user, database, source):
                return rule.name
        return None

    # -- internals ----------------------------------------------------------------------

    def _decide(
        self,
        st: Statement,
        app: str,
        user: str,
        database: str,
        now: float,
        index: int,
        journal: _Journal | None,
        take_tokens: bool = True,
        source: Identity | None = None,
    ) -> Decision:
        observed: list[Observation] = []
        decider: _Rule | None = None
        for rule in self._rules:
            action = rule.config.action
            watching = action == "log" or action == "dry_run"
            if decider is not None and not watching:
                continue  # an enforcing rule already decided; only watch rules still look
            if not rule.applies(st, app, user, database, now, source):
                continue
            if watching:
                observed.append(Observation(rule.name, action, index))  # type: ignore[arg-type]
            else:
                decider = rule
        if decider is None:
            return Decision("allow", observed=tuple(observed)) if observed else ALLOW
        action = decider.config.action
        if action == "allow":
            return Decision("allow", decider.name, observed=tuple(observed))
        if action == "deny":
            message = f"statement denied by policy {decider.name!r}"
            return Decision("deny", decider.name, SQLSTATE_DENIED, message, observed=tuple(observed))
        assert isinstance(action, RateLimitAction)
        if not take_tokens:
            return Decision("allow", decider.name, observed=tuple(observed))
        return self._take(decider.name, action, app, now, tuple(observed), journal)

    def _take(
        self,
        name: str,
        limit: RateLimitAction,
        app: str,
        now: float,
        observed: tuple[Observation, ...],
        journal: _Journal | None,
    ) -> Decision:
        key = (name, app)
        burst = float(limit.burst or 1)
        bucket = self._buckets.get(key)
        if journal is not None and key not in journal:
            journal[key] = None if bucket is None else (bucket.tokens, bucket.stamp)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
        elif now > bucket.stamp:
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * limit.rate_limit)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Decision("allow", name, observed=observed)
        wait = (1.0 - bucket.tokens) / limit.rate_limit
        if limit.over == "delay" and (limit.max_delay is None or wait <= limit.max_delay):
            bucket.tokens -= 1.0  # reserved: the next statement queues behind this one
            return Decision("delay", name, delay=wait, observed=observed)
        message = f"rate limit of policy {name!r} exceeded for application {app!r}"
        return Decision("deny", name, SQLSTATE_RATE_LIMITED, message, observed=observed)

    def _rollback(self, journal: _Journal) -> None:
        for key, saved in journal.items():
            if saved is None:
                self._buckets.pop(key, None)
            else:
                bucket = self._buckets[key]
                bucket.tokens, bucket.stamp = saved


def _outranks(d: Decision, current: Decision) -> bool:
    """For decide_many: a longer delay wins; among allows, the first one a rule decided."""
    if d.action == "delay":
        return d.delay > current.delay
    return current.action == "allow" and current.rule is None and d.rule is not None


def _with_observed(d: Decision, observed: list[Observation]) -> Decision:
    return Decision(d.action, d.rule, d.sqlstate, d.message, d.delay, tuple(observed))


def policy_log_line(match: Observation, statement: Statement, app: str, user: str, database: str) -> str:
    """One JSON line for a log / dry_run match: keys app, database, decision, rule, tables,
    user, verb, sorted, no whitespace, no trailing newline. ``decision`` is the rule's action
    (``log`` or ``dry_run``); no literal values are included (only the classified verb and
    table names)."""
    record = {
        "app": app,
        "user": user,
        "database": database,
        "verb": statement.verb,
        "tables": list(statement.tables),
        "rule": match.rule,
        "decision": match.action,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
