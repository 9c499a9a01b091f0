"""The SQL policy engine: config validation, matching, time windows, rate limits, order."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from l7 import PreparedStatements, SqlClassifier
from l7.model import Identity, Statement
from l7.policy import (
    SQLSTATE_DENIED,
    SQLSTATE_RATE_LIMITED,
    Decision,
    Observation,
    PolicyEngine,
    is_opaque,
    policy_log_line,
)
from l7.policy_config import KNOWN_VERBS, PolicyConfig, TimeWindow

ISSUE_YAML = """
policies:
  - name: no-destructive-at-night
    match: {verbs: [DROP, DELETE, TRUNCATE]}
    when: {between: "01:00-03:00", timezone: Europe/Berlin}
    action: deny
  - name: cap-inserts
    match: {apps: [orders], verbs: [INSERT], tables: ["audit_*"]}
    action: {rate_limit: 200/s, over: delay}
  - name: watch-ddl
    match: {verbs: [CREATE, ALTER, DROP]}
    action: log
"""


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def engine(*rules: dict[str, Any]) -> PolicyEngine:
    return PolicyEngine(PolicyConfig.model_validate({"policies": list(rules)}))


def st(verb: str, *tables: str, verbs: tuple[str, ...] | None = None) -> Statement:
    return Statement(verb=verb, tables=tables, verbs=verbs if verbs is not None else (verb,))


NOON = utc(2026, 1, 15, 12, 0)


# -- config validation -----------------------------------------------------------------


def test_issue_example_parses() -> None:
    cfg = PolicyConfig.model_validate(yaml.safe_load(ISSUE_YAML))
    night, cap, watch = cfg.policies
    assert night.match.verbs == ("DROP", "DELETE", "TRUNCATE")
    assert night.when is not None and night.when.between == (60, 180)
    assert cap.match.tables == ("audit_*",)
    assert not isinstance(cap.action, str)
    assert (cap.action.rate_limit, cap.action.burst, cap.action.over) == (200.0, 200, "delay")
    assert watch.action == "log" and not watch.enforcing and night.enforcing


@pytest.mark.parametrize(
    ("rule", "loc", "text"),
    [
        ({"name": "x", "action": "deny", "match": {"verbs": ["DROPP"]}}, ("match", "verbs"), "unknown verb"),
        ({"name": "x", "action": "deny", "match": {"verbs": []}}, ("match",), "empty list"),
        ({"name": "x", "action": "deny", "match": {"apps": "orders"}}, ("match", "apps"), "write a list"),
        ({"name": "x", "action": "deny", "match": {"tables": [""]}}, ("match", "tables"), "empty pattern"),
        ({"name": "x", "action": "deny", "match": {"colour": ["red"]}}, ("match", "colour"), "Extra inputs"),
        ({"name": "x", "action": "deny", "when": {"between": "1-3"}}, ("when", "between"), "HH:MM-HH:MM"),
        ({"name": "x", "action": "deny", "when": {"between": "25:00-01:00"}}, ("when", "between"), "time of day"),
        ({"name": "x", "action": "deny", "when": {"between": "01:60-02:00"}}, ("when", "between"), "time of day"),
        ({"name": "x", "action": "deny", "when": {"between": "02:00-02:00"}}, ("when", "between"), "equal"),
        (
            {"name": "x", "action": "deny", "when": {"between": "01:00-02:00", "timezone": "Mars/Base"}},
            ("when", "timezone"),
            "IANA",
        ),
        (
            {"name": "x", "action": "deny", "when": {"between": "01:00-02:00", "days": ["mo"]}},
            ("when", "days"),
            "unknown day",
        ),
        ({"name": "x", "action": "deny", "when": {"between": "01:00-02:00", "days": []}}, ("when", "days"), "empty"),
        ({"name": "x", "action": "deny", "when": {"between": "01:00-02:00", "at": 1}}, ("when", "at"), "Extra"),
        ({"name": "x", "action": "block"}, ("action",), "not an action"),
        ({"name": "x", "action": {"rate_limit": "200"}}, ("action", "rate_limit", "rate_limit"), "N/s or N/m"),
        ({"name": "x", "action": {"rate_limit": "200/h"}}, ("action", "rate_limit", "rate_limit"), "N/s or N/m"),
        ({"name": "x", "action": {"rate_limit": "0/s"}}, ("action", "rate_limit", "rate_limit"), "at least 1"),
        ({"name": "x", "action": {"rate_limit": "5/s", "burst": 0}}, ("action", "rate_limit", "burst"), "greater"),
        ({"name": "x", "action": {"rate_limit": "5/s", "over": "queue"}}, ("action", "rate_limit", "over"), "delay"),
        (
            {"name": "x", "action": {"rate_limit": "5/s", "max_delay": "soon"}},
            ("action", "rate_limit", "max_delay"),
            "duration",
        ),
        (
            {"name": "x", "action": {"rate_limit": "5/s", "over": "deny", "max_delay": "1s"}},
            ("action", "rate_limit"),
            "max_delay",
        ),
        ({"name": "x", "action": {"rate_limit": "5/s", "per": "user"}}, ("action", "rate_limit", "per"), "Extra"),
        ({"name": "", "action": "deny"}, ("name",), "at least 1"),
        ({"name": "x"}, ("action",), "Field required"),
        ({"name": "x", "action": "deny", "unless": {}}, ("unless",), "Extra"),
    ],
)
def test_config_errors_have_a_path_and_a_reason(rule: dict[str, Any], loc: tuple[str, ...], text: str) -> None:
    with pytest.raises(ValidationError) as err:
        PolicyConfig.model_validate({"policies": [rule]})
    errors = err.value.errors()
    assert any(e["loc"][:2] == ("policies", 0) and e["loc"][2:] == loc and text in e["msg"] for e in errors), errors


def test_duplicate_names_and_unknown_top_level_keys() -> None:
    with pytest.raises(ValidationError, match="duplicate policy name 'a'"):
        PolicyConfig.model_validate({"policies": [{"name": "a", "action": "log"}, {"name": "a", "action": "deny"}]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        PolicyConfig.model_validate({"policies": [], "rules": []})


def test_normalisation() -> None:
    rule = PolicyConfig.model_validate(
        {
            "policies": [
                {
                    "name": "n",
                    "match": {"verbs": [" drop", "Delete"], "apps": ["Orders*"], "tables": ["Audit_*"]},
                    "when": {"between": "22:00-24:00", "days": ["Friday", "SAT"]},
                    "action": {"rate_limit": "30/m", "max_delay": "500ms"},
                }
            ]
        }
    ).policies[0]
    assert rule.match.verbs == ("DROP", "DELETE")
    assert rule.match.apps == ("orders*",) and rule.match.tables == ("audit_*",)
    assert rule.when is not None and rule.when.between == (1320, 0) and rule.when.days == ("fri", "sat")
    assert not isinstance(rule.action, str)
    assert (rule.action.rate_limit, rule.action.burst, rule.action.max_delay) == (0.5, 30, 0.5)


def test_known_verbs_cover_what_the_classifier_says() -> None:
    # KNOWN_VERBS repeats l7.classify's vocabulary; this catches the two drifting apart.
    words = KNOWN_VERBS | {"START", "END", "ABORT", "DESCRIBE", "DESC", "ANALYSE", "VALUES", "TABLE", "WITH", "XYZZY"}
    tails = ["", " t", " TABLE t", " INDEX i ON t (a)", " INTO t VALUES (1)", " FROM t", " p AS DELETE FROM t", " (1)"]
    for dialect in ("postgres", "mysql"):
        clf = SqlClassifier(dialect)
        for word in sorted(words):
            for tail in tails:
                for s in clf.classify(word + tail):
                    assert {s.verb, *s.verbs} <= KNOWN_VERBS, (word + tail, s)
    with_cte = SqlClassifier("postgres").classify("WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d")
    assert {with_cte[0].verb, *with_cte[0].verbs} <= KNOWN_VERBS


def test_window_given_as_minutes() -> None:
    assert TimeWindow.model_validate({"between": (60, 180)}).between == (60, 180)
    with pytest.raises(ValidationError, match="starts in 00:00-23:59"):
        TimeWindow.model_validate({"between": (-5, 180)})


# -- time windows ------------------------------------------------------------------------

BERLIN = TimeWindow(between="01:00-03:00", timezone="Europe/Berlin")


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        # winter, CET = UTC+1
        (utc(2026, 1, 14, 23, 59), False),  # 00:59 local
        (utc(2026, 1, 15, 0, 0), True),  # 01:00 local, start included
        (utc(2026, 1, 15, 1, 30), True),  # 02:30 local
        (utc(2026, 1, 15, 1, 59), True),  # 02:59 local
        (utc(2026, 1, 15, 2, 0), False),  # 03:00 local, end excluded
        # summer, CEST = UTC+2: the same UTC times fall elsewhere
        (utc(2026, 7, 14, 22, 59), False),  # 00:59 local
        (utc(2026, 7, 14, 23, 0), True),  # 01:00 local
        (utc(2026, 7, 15, 0, 59), True),  # 02:59 local
        (utc(2026, 7, 15, 1, 0), False),  # 03:00 local
        (utc(2026, 7, 15, 1, 30), False),  # 03:30 local (02:30 local in winter: inside)
    ],
)
def test_window_is_local_wall_clock_time(when: float, inside: bool) -> None:
    assert BERLIN.contains(when) is inside


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (utc(2026, 1, 15, 21, 59), False),
        (utc(2026, 1, 15, 22, 0), True),
        (utc(2026, 1, 15, 23, 59), True),
        (utc(2026, 1, 16, 0, 0), True),
        (utc(2026, 1, 16, 1, 59), True),
        (utc(2026, 1, 16, 2, 0), False),
        (utc(2026, 1, 16, 12, 0), False),
    ],
)
def test_window_wrapping_midnight(when: float, inside: bool) -> None:
    window = TimeWindow(between="22:00-02:00")
    assert window.contains(when) is inside


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (utc(2026, 1, 16, 23, 0), True),  # Friday 23:00: the Friday window
        (utc(2026, 1, 17, 1, 0), True),  # Saturday 01:00: still the window that started Friday
        (utc(2026, 1, 16, 1, 0), False),  # Friday 01:00: the Thursday window
        (utc(2026, 1, 17, 23, 0), False),  # Saturday 23:00
        (utc(2026, 1, 17, 2, 0), False),  # Saturday 02:00: end excluded
    ],
)
def test_days_name_the_day_the_window_starts(when: float, inside: bool) -> None:
    assert datetime.fromtimestamp(utc(2026, 1, 16), UTC).strftime("%a") == "Fri"
    window = TimeWindow(between="22:00-02:00", days=["fri"])
    assert window.contains(when) is inside


def test_days_on_a_plain_window() -> None:
    window = TimeWindow(between="09:00-17:00", days=["mon", "tue", "wed", "thu", "fri"])
    assert window.contains(utc(2026, 1, 16, 12))  # Friday
    assert not window.contains(utc(2026, 1, 17, 12))  # Saturday


def test_issue_policy_at_night_and_by_day() -> None:
    eng = PolicyEngine(PolicyConfig.model_validate(yaml.safe_load(ISSUE_YAML)))
    night = utc(2026, 1, 15, 0, 30)
    d = eng.decide(st("DROP", "t"), "psql", "bob", "shop", night)
    assert (d.action, d.rule, d.sqlstate) == ("deny", "no-destructive-at-night", SQLSTATE_DENIED)
    assert d.message is not None and "no-destructive-at-night" in d.message
    d = eng.decide(st("DROP", "t"), "psql", "bob", "shop", NOON)
    assert d == Decision("allow", observed=(Observation("watch-ddl", "log"),))


# -- matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "statement", "app", "user", "db", "hit"),
    [
        ({"tables": ["audit_*"]}, st("INSERT", "audit_log"), "a", "u", "d", True),
        ({"tables": ["audit_*"]}, st("INSERT", "public.audit_log"), "a", "u", "d", True),
        ({"tables": ["audit_*"]}, st("INSERT", "public.orders", "AUDIT_x"), "a", "u", "d", True),
        ({"tables": ["audit_*"]}, st("INSERT", "audit"), "a", "u", "d", False),
        ({"tables": ["audit_*"]}, st("INSERT"), "a", "u", "d", False),
        ({"tables": ["public.*"]}, st("INSERT", "public.orders"), "a", "u", "d", True),
        ({"tables": ["public.*"]}, st("INSERT", "orders"), "a", "u", "d", False),  # schema unknown
        ({"tables": ["sales.orders"]}, st("INSERT", "public.orders"), "a", "u", "d", False),
        ({"verbs": ["INSERT"]}, st("DELETE", verbs=("DELETE", "INSERT")), "a", "u", "d", True),  # CTE
        ({"verbs": ["DELETE"]}, st("PREPARE", "t"), "a", "u", "d", False),
        ({"verbs": ["SELECT"]}, st("INSERT"), "a", "u", "d", False),
        ({"apps": ["orders"]}, st("SELECT"), "Orders", "u", "d", True),
        ({"apps": ["orders"]}, st("SELECT"), "orders-worker", "u", "d", False),
        ({"apps": ["orders*"]}, st("SELECT"), "orders-worker", "u", "d", True),
        ({"users": ["admin", "dba_*"]}, st("SELECT"), "a", "dba_ann", "d", True),
        ({"users": ["admin"]}, st("SELECT"), "a", "bob", "d", False),
        ({"databases": ["prod*"]}, st("SELECT"), "a", "u", "production", True),
        ({"databases": ["prod*"]}, st("SELECT"), "a", "u", "staging", False),
        ({"apps": ["orders"], "verbs": ["INSERT"]}, st("INSERT"), "web", "u", "d", False),  # AND
        ({}, st("OTHER"), "a", "u", "d", True),
        ({"verbs": ["DELETE"]}, st("OTHER"), "a", "u", "d", False),
        ({"verbs": ["OTHER"]}, st("OTHER", verbs=()), "a", "u", "d", True),
    ],
)
def test_matching(match: dict[str, Any], statement: Statement, app: str, user: str, db: str, hit: bool) -> None:
    d = engine({"name": "r", "match": match, "action": "deny"}).decide(statement, app, user, db, NOON)
    assert (d.action == "deny") is hit


def test_matching_the_placement_identity() -> None:
    """versions, instances and nodes match the session's whole identity (placement-derived);
    a session without one (a plain client) has them empty, so such rules pass it by."""
    canary = Identity("orders", "v2", "orders-1-abc", "node-b")
    stable = Identity("orders", "v1", "orders-0-def", "node-a")
    rule = {"name": "canary-no-delete", "match": {"verbs": ["DELETE"], "versions": ["v2*"]}, "action": "deny"}
    eng = engine(rule)
    assert eng.decide(st("DELETE"), "orders", "u", "d", NOON, source=canary).action == "deny"
    assert eng.decide(st("DELETE"), "orders", "u", "d", NOON, source=stable).action == "allow"
    assert eng.decide(st("DELETE"), "orders", "u", "d", NOON).action == "allow"
    assert eng.enforces_on("orders", "u", "d", canary) and not eng.enforces_on("orders", "u", "d", stable)
    on_b = engine({"name": "b", "match": {"nodes": ["node-b"], "instances": ["orders-*"]}, "action": "deny"})
    assert on_b.decide(st("SELECT"), "orders", "u", "d", NOON, source=canary).action == "deny"
    assert on_b.decide(st("SELECT"), "orders", "u", "d", NOON, source=stable).action == "allow"
    with pytest.raises(ValidationError, match="nodes: an empty list matches nothing"):
        PolicyConfig.model_validate({"policies": [{"name": "x", "match": {"nodes": []}, "action": "deny"}]})


def test_execute_resolved_and_opaque() -> None:
    clf = SqlClassifier("postgres")
    session = PreparedStatements()
    unknown, _, resolved = session.observe(clf.classify("EXECUTE q(1); PREPARE p AS DELETE FROM t; EXECUTE p(1)"))
    eng = engine({"name": "no-delete", "match": {"verbs": ["DELETE"]}, "action": "deny"})
    assert eng.decide(resolved, "a", "u", "d", NOON).action == "deny"
    assert eng.decide(unknown, "a", "u", "d", NOON).action == "allow"  # one statement: the plain rules
    assert is_opaque(unknown) and not is_opaque(resolved)
    assert is_opaque(clf.classify("frobnicate the db")[0])


def test_decide_many_fails_closed_on_opaque_statements() -> None:
    """What the filters ask: an opaque statement is refused when an enforcing rule covers the
    session (by identity, whatever its verbs), in that rule's name; tokens taken are returned."""
    clf = SqlClassifier("postgres")
    opaque = clf.classify("frobnicate the db")
    cap = {
        "name": "cap",
        "match": {"apps": ["orders"], "verbs": ["INSERT"]},
        "action": {"rate_limit": "1/s", "over": "deny"},
    }
    eng = engine({"name": "watch", "action": "log"}, cap)
    d = eng.decide_many([st("INSERT"), *opaque], "orders", "u", "d", NOON)
    assert (d.action, d.rule, d.sqlstate) == ("deny", "cap", "42501")
    assert d.message is not None and "cannot be known" in d.message
    assert [o.rule for o in d.observed] == ["watch", "watch"]
    # The INSERT's token was given back: the next INSERT still has the one token of the second.
    assert eng.decide_many([st("INSERT")], "orders", "u", "d", NOON).action == "allow"
    # A session no enforcing rule covers: counted, not refused.
    assert eng.decide_many(opaque, "billing", "u", "d", NOON).action == "allow"
    assert not eng.enforces_on("billing", "u", "d") and eng.enforces_on("orders", "u", "d")


# -- rate limits -------------------------------------------------------------------------


def actions(eng: PolicyEngine, now: float, n: int, app: str = "orders") -> list[tuple[str, float]]:
    return [(d.action, d.delay) for d in (eng.decide(st("INSERT"), app, "u", "d", now) for _ in range(n))]


def test_rate_limit_exactly_n_per_second() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "4/s", "over": "deny"}})
    assert actions(eng, 100.0, 5) == [("allow", 0.0)] * 4 + [("deny", 0.0)]
    assert actions(eng, 100.125, 1) == [("deny", 0.0)]  # half a token
    assert actions(eng, 100.25, 2) == [("allow", 0.0), ("deny", 0.0)]  # refusals took nothing
    assert actions(eng, 100.75, 3) == [("allow", 0.0), ("allow", 0.0), ("deny", 0.0)]
    assert actions(eng, 200.0, 5) == [("allow", 0.0)] * 4 + [("deny", 0.0)]  # never more than burst


def test_rate_limit_deny_sqlstate() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "1/s", "over": "deny"}})
    eng.decide(st("INSERT"), "orders", "u", "d", 0.0)
    d = eng.decide(st("INSERT"), "orders", "u", "d", 0.5)
    assert (d.action, d.rule, d.sqlstate) == ("deny", "cap", SQLSTATE_RATE_LIMITED)
    assert d.message is not None and "cap" in d.message and "orders" in d.message
    assert eng.decide(st("INSERT"), "orders", "u", "d", 1.0).action == "allow"


def test_rate_limit_delay_queues_behind_reserved_tokens() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "2/s", "over": "delay"}})
    assert actions(eng, 0.0, 5) == [("allow", 0.0), ("allow", 0.0), ("delay", 0.5), ("delay", 1.0), ("delay", 1.5)]
    # at t=1.5 the three reserved tokens have been paid back: the bucket is empty again
    assert actions(eng, 1.5, 1) == [("delay", 0.5)]


def test_rate_limit_max_delay_then_deny() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "2/s", "over": "delay", "max_delay": "750ms"}})
    got = [eng.decide(st("INSERT"), "orders", "u", "d", 0.0) for _ in range(4)]
    assert [(d.action, d.delay, d.sqlstate) for d in got] == [
        ("allow", 0.0, None),
        ("allow", 0.0, None),
        ("delay", 0.5, None),
        ("deny", 0.0, SQLSTATE_RATE_LIMITED),
    ]
    assert actions(eng, 0.0, 1) == [("deny", 0.0)]  # the refused one reserved nothing
    assert actions(eng, 0.5, 1) == [("delay", 0.5)]


def test_rate_limit_per_minute_burst_and_per_app() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "30/m", "burst": 2}})
    assert actions(eng, 0.0, 3) == [("allow", 0.0), ("allow", 0.0), ("delay", 2.0)]
    assert actions(eng, 0.0, 1, app="billing") == [("allow", 0.0)]  # its own bucket
    assert actions(eng, 100.0, 3) == [("allow", 0.0), ("allow", 0.0), ("delay", 2.0)]  # refilled to burst only


def test_rate_limit_clock_going_backwards_refills_nothing() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "1/s", "over": "deny"}})
    assert actions(eng, 10.0, 1) == [("allow", 0.0)]
    assert actions(eng, 5.0, 1) == [("deny", 0.0)]
    assert actions(eng, 11.0, 1) == [("allow", 0.0)]


def test_prune_forgets_full_buckets() -> None:
    eng = engine({"name": "cap", "action": {"rate_limit": "1/s"}})
    actions(eng, 0.0, 1, app="a")
    actions(eng, 0.0, 1, app="b")
    assert eng.prune(0.5) == 0
    assert eng.prune(1.0) == 2
    assert actions(eng, 1.0, 2, app="a") == [("allow", 0.0), ("delay", 1.0)]


# -- order -------------------------------------------------------------------------------


def test_watch_rules_see_every_statement_wherever_they_stand() -> None:
    eng = engine(
        {"name": "watch", "action": "log"},
        {"name": "rehearse", "match": {"verbs": ["DROP"]}, "action": "dry_run"},
        {"name": "skip", "match": {"verbs": ["SELECT"]}, "action": "log"},
        {"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"},
        {"name": "after", "action": "log"},
    )
    d = eng.decide(st("DROP", "t"), "a", "u", "d", NOON)
    assert (d.action, d.rule) == ("deny", "no-drop")
    assert d.observed == (
        Observation("watch", "log"),
        Observation("rehearse", "dry_run"),
        Observation("after", "log"),  # after the deny, and still counted
    )
    d = eng.decide(st("SELECT", "t"), "a", "u", "d", NOON)
    assert d == Decision(
        "allow", observed=(Observation("watch", "log"), Observation("skip", "log"), Observation("after", "log"))
    )


def test_allow_stops_evaluation_and_first_enforcing_rule_decides() -> None:
    eng = engine(
        {"name": "admins", "match": {"users": ["admin"]}, "action": "allow"},
        {"name": "cap", "match": {"verbs": ["DELETE"]}, "action": {"rate_limit": "1/s", "over": "deny"}},
        {"name": "no-delete", "match": {"verbs": ["DELETE"]}, "action": "deny"},
    )
    assert eng.decide(st("DELETE"), "a", "admin", "d", NOON) == Decision("allow", "admins")
    assert eng.decide(st("DELETE"), "a", "bob", "d", NOON) == Decision("allow", "cap")  # within the rate
    assert eng.decide(st("DELETE"), "a", "bob", "d", NOON).sqlstate == SQLSTATE_RATE_LIMITED
    assert eng.decide(st("SELECT"), "a", "bob", "d", NOON) == Decision("allow")
    assert len(PolicyEngine([])) == 0


# -- multi-statement strings ----------------------------------------------------------------


def test_decide_many_one_denied_runs_none() -> None:
    eng = engine(
        {"name": "watch", "action": "log"},
        {"name": "cap", "match": {"verbs": ["INSERT"]}, "action": {"rate_limit": "1/s", "over": "deny"}},
        {"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"},
        {"name": "no-truncate", "match": {"verbs": ["TRUNCATE"]}, "action": "deny"},
    )
    batch = [st("INSERT"), st("SELECT"), st("DROP"), st("TRUNCATE")]
    d = eng.decide_many(batch, "a", "u", "d", NOON)
    assert (d.action, d.rule, d.sqlstate) == ("deny", "no-drop", SQLSTATE_DENIED)
    assert [(o.rule, o.index) for o in d.observed] == [("watch", 0), ("watch", 1), ("watch", 2)]
    # the INSERT never ran, so its token was given back
    assert eng.decide(st("INSERT"), "a", "u", "d", NOON).action == "allow"


def test_decide_many_delay_is_the_longest_and_allow_names_a_rule() -> None:
    eng = engine(
        {"name": "ok-select", "match": {"verbs": ["SELECT"]}, "action": "allow"},
        {"name": "cap", "match": {"verbs": ["INSERT"]}, "action": {"rate_limit": "2/s"}},
    )
    d = eng.decide_many([st("SHOW"), st("SELECT"), st("INSERT")], "a", "u", "d", 0.0)
    assert (d.action, d.rule) == ("allow", "ok-select")
    d = eng.decide_many([st("INSERT"), st("INSERT"), st("INSERT")], "a", "u", "d", 0.0)
    assert (d.action, d.rule, d.delay) == ("delay", "cap", 1.0)
    assert eng.decide_many([], "a", "u", "d", 0.0) == Decision("allow")


# -- log line ----------------------------------------------------------------------------


def test_policy_log_line() -> None:
    statement = SqlClassifier("postgres").classify("DROP TABLE Public.Audit_Log")[0]
    line = policy_log_line(Observation("watch-ddl", "dry_run"), statement, "orders", "bob", "shop")
    assert "\n" not in line
    assert json.loads(line) == {
        "app": "orders",
        "user": "bob",
        "database": "shop",
        "verb": "DROP",
        "tables": ["public.audit_log"],
        "rule": "watch-ddl",
        "decision": "dry_run",
    }
    assert list(json.loads(line)) == sorted(json.loads(line))  # stable key order
    assert line == policy_log_line(Observation("watch-ddl", "dry_run"), statement, "orders", "bob", "shop")
