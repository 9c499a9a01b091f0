"""Statement classification: verbs, tables, evasions, MySQL syntax, cache and sessions."""

from __future__ import annotations

import pytest

from l7.classify import SqlClassifier, classify, classify_uncached
from l7.model import Statement
from l7.sql_session import PreparedStatements


def one(sql: str, dialect: str = "postgres") -> Statement:
    (st,) = classify_uncached(sql, dialect)  # type: ignore[arg-type]
    return st


@pytest.mark.parametrize(
    ("sql", "verb", "tables"),
    [
        # The evasions named in the issue.
        ("EXPLAIN ANALYZE DELETE FROM t", "DELETE", ("t",)),
        ("explain analyse verbose update t set a = 1", "UPDATE", ("t",)),
        ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t", "DELETE", ("t",)),
        ("EXPLAIN (ANALYZE true, FORMAT json) INSERT INTO t VALUES (1)", "INSERT", ("t",)),
        ("EXPLAIN (ANALYZE 1) DELETE FROM t", "DELETE", ("t",)),  # a literal: assume it runs
        ("EXPLAIN (ANALYZE off) DELETE FROM t", "EXPLAIN", ("t",)),
        ("EXPLAIN DELETE FROM t", "EXPLAIN", ("t",)),
        ("EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE", ("t",)),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE", ("t",)),
        ("with u as (update t set a = 1 returning *) select * from u", "UPDATE", ("t",)),
        ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM i", "INSERT", ("t",)),
        ("WITH d AS (DELETE FROM a), u AS (UPDATE b SET x = 1) INSERT INTO c SELECT 1", "DELETE", ("c", "a", "b")),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", "SELECT", ()),
        ("WITH x AS MATERIALIZED (SELECT * FROM a) SELECT * FROM x JOIN b ON true", "SELECT", ("b", "a")),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "DELETE", ("t",)),
        # Case, comments and quoting between keywords.
        ("dElEtE /* x */ FrOm -- y\n t", "DELETE", ("t",)),
        ("/* leading */ -- and\n SELECT * FROM t", "SELECT", ("t",)),
        ("DE/**/LETE FROM t", "OTHER", ()),  # a syntax error in PostgreSQL
        ('SELECT * FROM "Mixed"."Case", plain.NAME', "SELECT", ("Mixed.Case", "plain.name")),
        ('SELECT * FROM U&"d\\0061t"', "SELECT", ("d\\0061t",)),
        # Table extraction.
        ("SELECT a.x FROM a JOIN b ON a.id = b.id LEFT JOIN c USING (id), d", "SELECT", ("a", "b", "c", "d")),
        ("SELECT * FROM (SELECT * FROM a) s, b WHERE x IN (SELECT y FROM c)", "SELECT", ("a", "b", "c")),
        ("SELECT * FROM a WHERE EXISTS (SELECT 1 FROM b WHERE b.id = a.id)", "SELECT", ("a", "b")),
        ("SELECT extract(year FROM ts), substring(s FROM 2) FROM t WHERE a IS DISTINCT FROM b", "SELECT", ("t",)),
        ("SELECT * FROM generate_series(1, 3) g, LATERAL (SELECT * FROM u) x", "SELECT", ("u",)),
        ("SELECT * FROM ONLY parent", "SELECT", ("parent",)),
        ("SELECT * FROM t FOR UPDATE OF t SKIP LOCKED", "SELECT", ("t",)),
        ("SELECT 1 UNION SELECT 2 FROM z", "SELECT", ("z",)),
        ("(SELECT * FROM a) UNION (SELECT * FROM b)", "SELECT", ("a", "b")),
        ("TABLE t", "SELECT", ("t",)),
        ("VALUES (1), (2)", "SELECT", ()),
        ("INSERT INTO s.t (a, b) VALUES (1, 2)", "INSERT", ("s.t",)),
        ("INSERT INTO t SELECT * FROM u", "INSERT", ("t", "u")),
        ("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2", "INSERT", ("t",)),
        ("UPDATE t SET a = 1 FROM u WHERE t.id = u.id", "UPDATE", ("t", "u")),
        ("UPDATE ONLY t SET a = (SELECT max(b) FROM u)", "UPDATE", ("t", "u")),
        ("DELETE FROM t USING u WHERE t.id = u.id", "DELETE", ("t", "u")),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE", ("t", "s")),
        ("MERGE INTO t USING (SELECT * FROM s) x ON true WHEN NOT MATCHED THEN INSERT VALUES (1)", "MERGE", ("t", "s")),
        ("TRUNCATE a, b", "TRUNCATE", ("a", "b")),
        ("TRUNCATE TABLE ONLY a, s.b RESTART IDENTITY", "TRUNCATE", ("a", "s.b")),
        ("SELECT * INTO newt FROM old", "CREATE", ("newt", "old")),
        ("SELECT * INTO TEMP newt FROM old", "CREATE", ("newt", "old")),
        ("COPY t (a, b) FROM STDIN", "COPY", ("t",)),
        ("COPY (SELECT * FROM t) TO '/tmp/out'", "COPY", ("t",)),
        ("GRANT SELECT, UPDATE ON TABLE a, b TO bob", "GRANT", ("a", "b")),
        ("REVOKE ALL ON s.t FROM bob", "REVOKE", ("s.t",)),
        ("GRANT admin TO bob", "GRANT", ()),
        ("SET search_path = public", "SET", ()),
        ("SHOW work_mem", "SHOW", ()),
        ("CALL proc(1, 'a')", "CALL", ()),
        ("DO $$ BEGIN DELETE FROM t; END $$", "DO", ()),  # body is opaque PL/pgSQL
        ("VACUUM (VERBOSE, ANALYZE) a, b", "VACUUM", ("a", "b")),
        ("ANALYZE t (a, b)", "ANALYZE", ("t",)),
        ("LOCK TABLE a, b IN ACCESS EXCLUSIVE MODE", "LOCK", ("a", "b")),
        ("LISTEN ch", "LISTEN", ()),
        ("NOTIFY ch, 'payload'", "NOTIFY", ()),
        ("UNLISTEN *", "UNLISTEN", ()),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "BEGIN", ()),
        ("START TRANSACTION", "BEGIN", ()),
        ("COMMIT", "COMMIT", ()),
        ("END", "COMMIT", ()),
        ("ABORT", "ROLLBACK", ()),
        ("ROLLBACK TO SAVEPOINT s", "ROLLBACK", ()),
        ("SAVEPOINT s", "SAVEPOINT", ()),
        ("DECLARE c CURSOR FOR SELECT * FROM t", "DECLARE", ("t",)),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", "REFRESH", ("mv",)),
        ("CREATE TABLE t (id int REFERENCES o(id))", "CREATE", ("t", "o")),
        ("CREATE TABLE t AS SELECT * FROM u", "CREATE", ("t", "u")),
        ("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON ONLY t (a)", "CREATE", ("t",)),
        ("DROP TABLE IF EXISTS a, s.b CASCADE", "DROP", ("a", "s.b")),
        ("ALTER TABLE ONLY t ADD COLUMN b int", "ALTER", ("t",)),
        ("CREATE TRIGGER tr AFTER DELETE ON t FOR EACH ROW EXECUTE FUNCTION f()", "CREATE", ("t",)),
        ("WITH x AS (SELECT 1) DELETE FROM t", "DELETE", ("t",)),
        ("SELECT * FROM t1 NATURAL JOIN t2 CROSS JOIN t3", "SELECT", ("t1", "t2", "t3")),
        ("SELECT * FROM a AS x, b y", "SELECT", ("a", "b")),
        ("SELECT (SELECT max(a) FROM b) FROM c", "SELECT", ("b", "c")),
        ("SELECT 1 FROM t WHERE x = ANY(SELECT y FROM u)", "SELECT", ("t", "u")),
        ("INSERT INTO t SELECT * FROM u UNION SELECT * FROM v", "INSERT", ("t", "u", "v")),
        ("SELECT * FROM ROWS FROM (f(), g()) x", "SELECT", ()),
        ("SELECT * FROM rows", "SELECT", ("rows",)),
        ("UPDATE t SET (a, b) = (SELECT x, y FROM u)", "UPDATE", ("t", "u")),
        ("SELECT a, b FROM t GROUP BY a, b ORDER BY c, d", "SELECT", ("t",)),
        ("CREATE TABLE t (LIKE u INCLUDING ALL)", "CREATE", ("t", "u")),
        ("ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (id)", "ALTER", ("t", "u")),
        ("WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t) SELECT sum(n) FROM t", "SELECT", ()),
        ("", "OTHER", ()),
        ("+++", "OTHER", ()),
        ("FROBNICATE the database", "OTHER", ()),
    ],
)
def test_postgres_verbs_and_tables(sql: str, verb: str, tables: tuple[str, ...]) -> None:
    sts = classify_uncached(sql)
    if not sql.strip("+ ") and verb == "OTHER":
        assert all(s.verb == "OTHER" for s in sts)
        return
    (st,) = sts
    assert (st.verb, st.tables) == (verb, tables)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("CREATE TABLE t (a int)", "TABLE"),
        ("CREATE TEMP TABLE t (a int)", "TABLE"),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", "VIEW"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", "MATERIALIZED VIEW"),
        ("CREATE FOREIGN DATA WRAPPER w", "FOREIGN DATA WRAPPER"),
        ("CREATE UNIQUE INDEX i ON t (a)", "INDEX"),
        ("DROP SCHEMA s CASCADE", "SCHEMA"),
        ("ALTER ROLE bob SUPERUSER", "ROLE"),
        ("CREATE EXTENSION pgcrypto", "EXTENSION"),
        ("DROP DATABASE prod", "DATABASE"),
        ("CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "FUNCTION"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "SYSTEM"),
    ],
)
def test_ddl_object_kind(sql: str, kind: str) -> None:
    assert one(sql).object_kind == kind


def test_fields() -> None:
    assert one("COPY t FROM STDIN").direction == "FROM"
    assert one("COPY t TO STDOUT").direction == "TO"
    assert one("DROP DATABASE prod").name == "prod"
    assert one("SET LOCAL statement_timeout = 5").name == "statement_timeout"
    st = one("EXPLAIN SELECT * FROM t")
    assert st.inner is not None and st.inner.verb == "SELECT"
    assert one("WITH d AS (DELETE FROM t) SELECT 1").verbs == ("DELETE", "SELECT")
    assert one("EXPLAIN ANALYZE DELETE FROM t").command == "EXPLAIN"
    assert one("PREPARE TRANSACTION 'x'").object_kind == "TRANSACTION"


def test_two_statements_are_two() -> None:
    assert [(s.verb, s.tables) for s in classify("SELECT 1; DROP TABLE t")] == [("SELECT", ()), ("DROP", ("t",))]
    assert [s.verb for s in classify("SELECT ';'; DELETE FROM t -- ;")] == ["SELECT", "DELETE"]


def test_prepare_and_execute_resolve_per_connection() -> None:
    session = PreparedStatements()
    sts = session.observe(classify("PREPARE p (int) AS DELETE FROM t WHERE id = $1; EXECUTE p(1)"))
    assert sts[0].verb == "PREPARE" and sts[0].name == "p" and sts[0].inner is not None
    assert sts[0].inner.verb == "DELETE"
    assert (sts[1].verb, sts[1].tables, sts[1].verbs) == ("DELETE", ("t",), ("DELETE", "EXECUTE"))
    # Another connection never saw the PREPARE: the EXECUTE stays unknown.
    (other,) = PreparedStatements().observe(classify("EXECUTE p(2)"))
    assert (other.verb, other.name, other.inner) == ("EXECUTE", "p", None)
    session.observe(classify("DEALLOCATE p"))
    assert session.observe(classify("EXECUTE p(1)"))[0].verb == "EXECUTE"
    session.observe(classify("PREPARE a AS SELECT 1; PREPARE b AS UPDATE t SET x = 1; DEALLOCATE ALL"))
    assert len(session) == 0


def test_explain_analyze_execute_resolves() -> None:
    session = PreparedStatements()
    sql = "PREPARE p AS WITH d AS (DELETE FROM t RETURNING *) SELECT 1; EXPLAIN ANALYZE EXECUTE p"
    sts = session.observe(classify(sql))
    assert (sts[1].verb, sts[1].tables, sts[1].command) == ("DELETE", ("t",), "EXPLAIN")


def test_protocol_level_prepare() -> None:
    session = PreparedStatements()
    (inner,) = classify("UPDATE t SET a = $1")
    session.prepare("s1", inner)  # what a decoder does on a Parse message
    assert session.resolve(Statement("EXECUTE", name="s1")).verb == "UPDATE"


def test_mysql_reprepare_from_variable_forgets_old_meaning() -> None:
    session = PreparedStatements()
    sts = session.observe(classify("PREPARE s FROM 'SELECT 1'; PREPARE s FROM @q; EXECUTE s", "mysql"))
    assert sts[0].inner is not None and sts[0].inner.verb == "SELECT"
    assert sts[2].verb == "EXECUTE" and sts[2].inner is None


@pytest.mark.parametrize(
    ("sql", "verb", "tables"),
    [
        ("SELECT * FROM `db`.`My Table` WHERE a = 1", "SELECT", ("db.My Table",)),
        ("DELETE FROM t # comment\n WHERE a = 1", "DELETE", ("t",)),
        ("/*!50000 DROP TABLE t */", "DROP", ("t",)),
        ("SELECT 1 /*! ; DELETE FROM t */", "SELECT", ()),
        ("REPLACE INTO t (a) VALUES (1)", "REPLACE", ("t",)),
        ("REPLACE t VALUES (1)", "REPLACE", ("t",)),
        ("INSERT IGNORE t VALUES (1) ON DUPLICATE KEY UPDATE a = a + 1", "INSERT", ("t",)),
        ("INSERT LOW_PRIORITY INTO t SELECT * FROM u", "INSERT", ("t", "u")),
        ("UPDATE t1, t2 SET t1.a = t2.a WHERE t1.id = t2.id", "UPDATE", ("t1", "t2")),
        ("DELETE t1, t2 FROM t1 JOIN t2 ON t1.id = t2.id", "DELETE", ("t1", "t2")),
        ("DELETE QUICK FROM t", "DELETE", ("t",)),
        ("SELECT * FROM t1 STRAIGHT_JOIN t2", "SELECT", ("t1", "t2")),
        ("LOAD DATA LOCAL INFILE '/tmp/x' REPLACE INTO TABLE t", "LOAD", ("t",)),
        ("SELECT * FROM t INTO OUTFILE '/tmp/x'", "SELECT", ("t",)),
        ("SELECT a INTO @v FROM t", "SELECT", ("t",)),
        ("SHOW TABLES", "SHOW", ()),
        ("DESCRIBE t", "EXPLAIN", ("t",)),
        ("EXPLAIN ANALYZE SELECT * FROM t", "SELECT", ("t",)),
        ("EXPLAIN FORMAT=JSON DELETE FROM t", "EXPLAIN", ("t",)),
        ("USE prod", "USE", ()),
        ("SET NAMES utf8mb4", "SET", ()),
        ("LOCK TABLES a READ, b WRITE", "LOCK", ("a",)),
        ("RENAME TABLE a TO b, c TO d", "RENAME", ("a", "b", "c", "d")),
        ("OPTIMIZE TABLE t", "OPTIMIZE", ("t",)),
        ("CREATE DEFINER = `root`@`%` VIEW v AS SELECT * FROM t", "CREATE", ("v", "t")),
        ("GRANT ALL ON db.* TO 'u'@'%'", "GRANT", ("db.*",)),
        ("CALL p(@a)", "CALL", ()),
        ("DO SLEEP(5)", "DO", ()),
        ("XA START 'x'", "XA", ()),
    ],
)
def test_mysql(sql: str, verb: str, tables: tuple[str, ...]) -> None:
    st = classify_uncached(sql, "mysql")[0]
    assert (st.verb, st.tables) == (verb, tables)


def test_mysql_prepare_from_literal_is_classified_and_not_cached() -> None:
    clf = SqlClassifier("mysql")
    (a,) = clf.classify("PREPARE s FROM 'DELETE FROM t WHERE id = ?'")
    (b,) = clf.classify("PREPARE s FROM 'SELECT * FROM u'")
    assert a.inner is not None and a.inner.verb == "DELETE" and a.tables == ("t",)
    assert b.inner is not None and b.inner.verb == "SELECT" and b.tables == ("u",)
    assert a.digest == b.digest


def test_cache_hits_misses_and_bound() -> None:
    clf = SqlClassifier(cache_size=2)
    clf.classify("SELECT * FROM t WHERE id = 1")
    clf.classify("select * from t where id = 2 -- other literal, same digest")
    assert (clf.cache.hits, clf.cache.misses) == (1, 1)
    clf.classify("SELECT * FROM u")
    clf.classify("SELECT * FROM v")
    assert len(clf.cache) == 2
    assert "SELECT * FROM T WHERE ID = ?" not in clf.cache  # least recently used went first
    # Tables are in the digest, so a different table is a different entry.
    assert clf.classify("SELECT * FROM w")[0].tables == ("w",)


def test_cache_disabled() -> None:
    clf = SqlClassifier(cache_size=0)
    clf.classify("SELECT 1")
    clf.classify("SELECT 1")
    assert (clf.cache.hits, clf.cache.misses, len(clf.cache)) == (0, 2, 0)


def test_cached_result_equals_uncached() -> None:
    clf = SqlClassifier()
    sql = "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d; COPY t TO STDOUT; TRUNCATE a"
    assert clf.classify(sql) == classify_uncached(sql) == clf.classify(sql)


def test_readme_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "l7" / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "l7/README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["PREPARE ('t',)", "DELETE ('t',)"]
