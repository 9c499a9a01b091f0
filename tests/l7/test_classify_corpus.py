"""The fast classifier against sqlparse (the reference) on a generated corpus, and properties.

sqlparse's ``get_type()`` is the oracle wherever it has an opinion (not UNKNOWN). Where it is
known to be wrong, the corpus marks the case and the test asserts both what sqlparse says and
that we say the right thing:

* data-modifying CTE (``WITH d AS (DELETE ...) SELECT``): sqlparse SELECT, we DELETE;
* ``SELECT ... INTO new_table``: sqlparse SELECT, we CREATE (PostgreSQL creates the table).

sqlparse has no opinion (UNKNOWN) on EXPLAIN, COPY, GRANT, CALL, SET, BEGIN...; there the
corpus's expected verb is the only check.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest
import sqlparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l7.classify import SqlClassifier, classify, classify_uncached
from l7.sql_lexer import skeleton, split

# sqlparse type -> our verb.
_SQLPARSE_MAP = {"CREATE OR REPLACE": "CREATE"}

# (template, our verb, sqlparse known wrong: what it says instead, or None). {t} and {u} are
# tables, {v} a literal. Keywords are upper case so the case transform can act on them alone.
TEMPLATES: list[tuple[str, str, str | None]] = [
    ("SELECT a, b FROM {t} WHERE id = {v}", "SELECT", None),
    ("SELECT * FROM {t} x JOIN {u} y ON x.id = y.id WHERE x.v > {v} ORDER BY 1 LIMIT 10", "SELECT", None),
    ("SELECT count(*) FROM {t} WHERE a IN (SELECT a FROM {u} WHERE b = {v})", "SELECT", None),
    ("SELECT * FROM {t} WHERE a IN ({v}, {v}, {v}) FOR UPDATE", "SELECT", None),
    ("INSERT INTO {t} (a, b) VALUES ({v}, {v})", "INSERT", None),
    ("INSERT INTO {t} SELECT * FROM {u} WHERE a = {v}", "INSERT", None),
    ("INSERT INTO {t} (a) VALUES ({v}) ON CONFLICT (a) DO UPDATE SET a = {v}", "INSERT", None),
    ("UPDATE {t} SET a = {v} WHERE id = {v}", "UPDATE", None),
    ("UPDATE {t} SET a = {v} FROM {u} WHERE {u}.id = 1", "UPDATE", None),
    ("DELETE FROM {t} WHERE id = {v}", "DELETE", None),
    ("DELETE FROM {t} USING {u} WHERE a = {v}", "DELETE", None),
    ("MERGE INTO {t} AS d USING {u} AS s ON d.id = s.id WHEN MATCHED THEN UPDATE SET a = {v}", "MERGE", None),
    ("TRUNCATE {t}", "TRUNCATE", None),
    ("CREATE TABLE {t} (a int DEFAULT {v})", "CREATE", None),
    ("CREATE INDEX i ON {t} (a)", "CREATE", None),
    ("CREATE OR REPLACE VIEW {t} AS SELECT {v}", "CREATE", None),
    ("ALTER TABLE {t} ADD COLUMN c int DEFAULT {v}", "ALTER", None),
    ("DROP TABLE IF EXISTS {t}", "DROP", None),
    ("WITH x AS (SELECT * FROM {t}) SELECT * FROM x WHERE a = {v}", "SELECT", None),
    ("WITH x AS (SELECT * FROM {t}) INSERT INTO {u} SELECT * FROM x", "INSERT", None),
    ("WITH d AS (DELETE FROM {t} WHERE a = {v} RETURNING *) SELECT * FROM d", "DELETE", "SELECT"),
    ("WITH u AS (UPDATE {t} SET a = {v} RETURNING *) SELECT * FROM u", "UPDATE", "SELECT"),
    ("WITH i AS (INSERT INTO {t} VALUES ({v}) RETURNING *) SELECT * FROM i", "INSERT", "SELECT"),
    ("SELECT * INTO new_t FROM {t} WHERE a = {v}", "CREATE", "SELECT"),
    ("EXPLAIN ANALYZE DELETE FROM {t} WHERE a = {v}", "DELETE", None),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE {t} SET a = {v}", "UPDATE", None),
    ("EXPLAIN SELECT * FROM {t}", "EXPLAIN", None),
    ("COPY {t} FROM STDIN", "COPY", None),
    ("COPY (SELECT * FROM {t} WHERE a = {v}) TO STDOUT", "COPY", None),
    ("GRANT SELECT ON {t} TO bob", "GRANT", None),
    ("REVOKE ALL ON {t} FROM bob", "REVOKE", None),
    ("CALL p({v})", "CALL", None),
    ("SET statement_timeout = {v}", "SET", None),
    ("SHOW work_mem", "SHOW", None),
    ("BEGIN", "BEGIN", None),
    ("COMMIT", "COMMIT", None),
    ("ROLLBACK", "ROLLBACK", None),
    ("VACUUM ANALYZE {t}", "VACUUM", None),
    ("LOCK TABLE {t} IN SHARE MODE", "LOCK", None),
    ("LISTEN ch", "LISTEN", None),
    ("NOTIFY ch, {v}", "NOTIFY", None),
    ("DO {v}", "DO", None),
]
TABLES = ["t", "public.accounts", '"Mixed Case"', 's."T"']
LITERALS = ["1", "'it''s; here'", "$$x; y$$", "$q$ ; $q$", "E'\\'; x'", "3.5e2", "-7"]
COMMENTS = ["", "/* c; */ ", "-- c;\n", "/* a /* nested; */ b */ "]


@dataclass(frozen=True)
class Case:
    sql: str
    verb: str
    sqlparse_says: str | None  # sqlparse's known-wrong answer
    oracle: bool  # sqlparse can lex it (no nested comments, no E'' strings)


def _keywords(template: str, mode: int) -> str:
    if mode == 0:
        return template
    words = template.split(" ")
    return " ".join(w.lower() if w.isupper() and (mode == 1 or i % 2) else w for i, w in enumerate(words))


def build_corpus(n: int = 1200, seed: int = 7) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        template, verb, wrong = TEMPLATES[k % len(TEMPLATES)]
        comment = rng.choice(COMMENTS)
        lit = rng.choice(LITERALS)
        sql = _keywords(template, rng.randrange(3))
        sql = sql.replace("{t}", rng.choice(TABLES)).replace("{u}", rng.choice(TABLES)).replace("{v}", lit)
        # Comments before the statement and between its first two words.
        head, _, tail = sql.partition(" ")
        sql = comment + head + (" " + rng.choice(COMMENTS) + tail if tail else "") + rng.choice(["", ";", " ; "])
        oracle = "nested" not in sql and "E'" not in sql and "$q$" not in sql
        cases.append(Case(sql, verb, wrong, oracle))
    return cases


CORPUS = build_corpus()


def test_corpus_covers_every_template() -> None:
    assert {c.verb for c in CORPUS} >= {t[1] for t in TEMPLATES}
    assert len(CORPUS) >= 1000


def test_fast_path_classifies_corpus() -> None:
    got = [(c.sql, [s.verb for s in classify_uncached(c.sql)], [c.verb]) for c in CORPUS]
    wrong = [g for g in got if g[1] != g[2]]
    assert wrong == []


def test_agrees_with_sqlparse() -> None:
    disagree = []
    checked = 0
    for case in CORPUS:
        if not case.oracle:
            continue
        (theirs,) = [s for s in sqlparse.parse(case.sql) if str(s).strip()]
        their_type = _SQLPARSE_MAP.get(theirs.get_type(), theirs.get_type())
        (ours,) = classify_uncached(case.sql)
        if case.sqlparse_says is not None:
            # Documented sqlparse mistakes: it must still make them, and we must not.
            assert their_type == case.sqlparse_says, case.sql
            assert ours.verb == case.verb != their_type
            continue
        if their_type == "UNKNOWN":
            continue
        checked += 1
        if their_type != ours.verb:
            disagree.append((case.sql, their_type, ours.verb))
    assert disagree == []
    assert checked > 250


def test_cached_and_uncached_agree_on_corpus() -> None:
    clf = SqlClassifier(cache_size=64)
    for case in CORPUS:
        assert clf.classify(case.sql) == classify_uncached(case.sql)
    assert clf.cache.hits > 0


def test_split_count_agrees_with_sqlparse() -> None:
    rng = random.Random(3)
    oracle = [c.sql.rstrip(" ;") for c in CORPUS if c.oracle and "--" not in c.sql]
    for _ in range(100):
        parts = rng.sample(oracle, 3)
        sql = "; ".join(parts)
        assert len(split(sql)) == len([s for s in sqlparse.split(sql) if s.strip(" ;")]) == 3, sql


# --- properties -------------------------------------------------------------------------

_PIECES = [*"'\"`$;/*-#\\ \n\tEeU&!()0123456789.,:@?", "SELECT", "DROP", "begin", "atomic", "END", "case", "$a$"]
_SQLISH = st.lists(st.sampled_from([*_PIECES, "/*!", "*/", "x", "ß"]), max_size=40).map("".join)
_ANY = st.one_of(st.text(max_size=80), _SQLISH)
_DIALECT = st.sampled_from(["postgres", "mysql"])
_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(sql=_ANY, dialect=_DIALECT)
def test_never_raises(sql: str, dialect: str) -> None:
    for st_ in classify_uncached(sql, dialect):  # type: ignore[arg-type]
        assert st_.verb.isupper() or st_.verb == "OTHER"
    classify(sql, dialect)  # type: ignore[arg-type]


@_FAST
@given(sql=_ANY, dialect=_DIALECT, bs=st.booleans())
def test_split_is_stable(sql: str, dialect: str, bs: bool) -> None:
    first = split(sql, dialect, backslash_escapes=bs)
    # Each statement's text lexes back to itself ...
    for s in first:
        (again,) = split(s.text, dialect, backslash_escapes=bs)
        assert again.digest == s.digest
    # ... and re-joining the texts gives the same statements.
    rejoined = split(";\n".join(s.text for s in first), dialect, backslash_escapes=bs)
    assert [s.digest for s in rejoined] == [s.digest for s in first]


@pytest.mark.parametrize("dialect", ["postgres", "mysql"])
def test_never_raises_on_corpus_fragments(dialect: str) -> None:
    # Every prefix of a few tricky statements: the lexer sees truncated input mid-construct.
    for sql in ['SELECT $a$ x $a$, E\'\\\'\', "q""x", /* /* */ */ 1', "SELECT `a``b`, 'c\\'d' # e", "/*!5 DELETE */"]:
        for k in range(len(sql) + 1):
            classify_uncached(sql[:k], dialect)  # type: ignore[arg-type]


_SHARED = {d: SqlClassifier(d, cache_size=100_000) for d in ("postgres", "mysql")}


@_FAST
@given(sql=_ANY, dialect=_DIALECT)
def test_cache_is_sound(sql: str, dialect: str) -> None:
    # One cache across all examples: two texts with one digest must classify alike, or the
    # cached answer for the first would be returned for the second.
    assert _SHARED[dialect].classify(sql) == classify_uncached(sql, dialect)  # type: ignore[arg-type]


# --- the skeleton cache key -------------------------------------------------------------------

_LITERALS = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(str),
    st.floats(min_value=0, max_value=1e9, allow_nan=False).map(repr),
    st.lists(st.sampled_from([*"ab ;'\"$-/*\\0", "DROP", "--"]), max_size=12).map(
        lambda parts: "'" + "".join(parts).replace("'", "''") + "'"
    ),
)


@_FAST
@given(
    template=_SQLISH,
    fills=st.lists(st.tuples(_LITERALS, _LITERALS), min_size=1, max_size=4),
    dialect=_DIALECT,
    bs=st.booleans(),
)
def test_equal_skeletons_classify_alike(template: str, fills: list[tuple[str, str]], dialect: str, bs: bool) -> None:
    """Two texts that differ only in the literals put into the same template: when their
    skeletons are equal, the lexer must read them as the same statements (in either string
    escaping mode: the skeleton does not know which one the session is in)."""
    a = b = template
    for left, right in fills:
        a, b = f"{a} {left} ", f"{b} {right} "
    ka, kb = skeleton(a, dialect), skeleton(b, dialect)
    if ka is not None and ka == kb:
        digests_a = [s.digest for s in split(a, dialect, backslash_escapes=bs)]
        assert digests_a == [s.digest for s in split(b, dialect, backslash_escapes=bs)], (a, b)


def test_mysql_skeletons() -> None:
    """Literals differ: one skeleton; what MySQL reads differently gets none."""
    assert skeleton("SELECT c FROM sbtest1 WHERE id=17", "mysql") == skeleton(
        "SELECT c FROM sbtest1 WHERE id=4", "mysql"
    )
    assert skeleton("SELECT 'a''b', 2.5e3", "mysql") == "SELECT \0, \0"
    for unsafe in ("SELECT `1`", "SELECT 1 # x", 'SELECT "a"', "SELECT 'a\\'", "prepare s from 'x'", "/*!1 x*/"):
        assert skeleton(unsafe, "mysql") is None, unsafe
    clf = SqlClassifier("mysql")
    for i in range(10):
        assert [s.verb for s in clf.classify(f"SELECT c FROM t WHERE id={i}; DELETE FROM t WHERE id={i}")] == [
            "SELECT",
            "DELETE",
        ]
    assert clf.texts.hits == 9


def test_skeleton_cache_agrees_with_the_lexer_on_corpus() -> None:
    clf = SqlClassifier(cache_size=4096)
    rng = random.Random(5)
    for case in CORPUS:
        sql = case.sql
        varied = re.sub(r"(?<![\w$])\d+(?![\w$])", lambda _: str(rng.randint(0, 99999)), sql)
        for text in (sql, varied):
            assert clf.classify(text) == classify_uncached(text), text
    assert clf.texts.hits > 50  # the skeleton level answered the varied copies


@pytest.mark.parametrize(
    ("first", "second"),
    [("1?", "??"), (".4.4", ".444"), ("SELECT 1? 2", "SELECT ?? 2"), ("SELECT 4.4.4", "SELECT 4.4 .4")],
)
def test_skeleton_cache_is_not_fooled(first: str, second: str) -> None:
    """Found by fuzzing: a placeholder that can also be written ("?"), and numbers that touch a
    dot, once gave two texts one skeleton although the lexer reads them differently."""
    clf = SqlClassifier()
    assert clf.classify(first) == classify_uncached(first)
    assert clf.classify(second) == classify_uncached(second)
