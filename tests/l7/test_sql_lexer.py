"""Statement splitting and digests: where statements end must match the server."""

from __future__ import annotations

import pytest

from l7.sql_lexer import LITERAL, QIDENT, WORD, split


def digests(sql: str, dialect: str = "postgres", **kw: bool) -> list[str]:
    return [s.digest for s in split(sql, dialect, **kw)]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1; DROP TABLE t", ["SELECT ?", "DROP TABLE T"]),
        ("SELECT 1;;; ;", ["SELECT ?"]),
        ("-- only a comment; really\n", []),
        ("SELECT 'a;b'; SELECT 2", ["SELECT ?", "SELECT ?"]),
        # standard_conforming_strings: '' is a quote, a backslash is just a backslash.
        ("SELECT 'it''s; fine'", ["SELECT ?"]),
        ("SELECT '\\'; DROP TABLE t; --'", ["SELECT ?", "DROP TABLE T"]),
        # E'' strings take backslash escapes: \' does not end the string.
        ("SELECT E'\\'; DROP TABLE t; --'", ["SELECT ?"]),
        ("SELECT e'a\\\\'; DROP TABLE t", ["SELECT ?", "DROP TABLE T"]),
        # Dollar quotes, with and without tags; a different tag inside does not close it.
        ("SELECT $$a;b$$; SELECT 2", ["SELECT ?", "SELECT ?"]),
        ("SELECT $fn$ $$; DROP TABLE t; $$ $fn$", ["SELECT ?"]),
        ("SELECT $a$x$b$;$b$y$a$, 1", ["SELECT ?+"]),
        ("SELECT $1, $2; SELECT 3", ["SELECT $1 , $2", "SELECT ?"]),
        ("SELECT a$b FROM t", ["SELECT A$B FROM T"]),
        # Quoted identifiers keep their text (and their ';').
        ('SELECT * FROM "we;ird" ; SELECT 1', ['SELECT * FROM "we;ird"', "SELECT ?"]),
        ('SELECT * FROM "a""b"', ['SELECT * FROM "a""b"']),
        # Nested comments (PostgreSQL) hide the ';' and the DROP.
        ("SELECT /* a /* b; */ DROP TABLE t; */ 1", ["SELECT ?"]),
        ("SELECT 1 /* a */ /* b */ + 2", ["SELECT ? + ?"]),
        ("SELECT 1 -- c; DROP TABLE t\n; SELECT 2", ["SELECT ?", "SELECT ?"]),
        ("SELECT 1+--c\n2", ["SELECT ? + ?"]),
        # Comments separate tokens: DE/**/LETE is two words.
        ("DE/**/LETE FROM t", ["DE LETE FROM T"]),
        # Unterminated constructs run to the end: nothing after them can execute.
        ("SELECT 'abc; DROP TABLE t", ["SELECT ?"]),
        ("SELECT $$abc; DROP TABLE t", ["SELECT ?"]),
        ("SELECT /* abc; DROP TABLE t", ["SELECT"]),
        ('SELECT "abc; DROP TABLE t', ['SELECT "abc; DROP TABLE t"']),
        # Literals and case fold into the digest; IN lists of any length share one digest.
        ("select * FROM t WHERE a IN (1, 2, 3) AND b = 'x'", ["SELECT * FROM T WHERE A IN ( ?+ ) AND B = ?"]),
        ("SELECT * FROM t WHERE a IN (7)", ["SELECT * FROM T WHERE A IN ( ? )"]),
        ("SELECT 1.5e3, .5, 0x1F, 1_000, B'101', X'ff', U&'a'", ["SELECT ?+"]),
        ("SELECT a::int", ["SELECT A :: INT"]),
        # SQL-standard function bodies (PG 14+) keep their inner ';'.
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; "
            "SELECT CASE WHEN true THEN 1 END; END; DROP TABLE t",
            [
                "CREATE FUNCTION F ( ) RETURNS INT LANGUAGE SQL BEGIN ATOMIC SELECT ? ; "
                "SELECT CASE WHEN TRUE THEN ? END ; END",
                "DROP TABLE T",
            ],
        ),
        ("BEGIN; SELECT 1; END", ["BEGIN", "SELECT ?", "END"]),
    ],
)
def test_postgres_split(sql: str, expected: list[str]) -> None:
    assert digests(sql) == expected


def test_postgres_backslash_escapes_when_scs_is_off() -> None:
    # standard_conforming_strings=off: the server reads \' as a quote, so this is one string.
    assert digests("SELECT '\\'; DROP TABLE t; --'", backslash_escapes=True) == ["SELECT ?"]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT `a;b` FROM t; SELECT 1", ["SELECT `a;b` FROM T", "SELECT ?"]),
        ("SELECT * FROM `x``y`", ["SELECT * FROM `x``y`"]),
        ("SELECT 1 # comment; DROP TABLE t\n; SELECT 2", ["SELECT ?", "SELECT ?"]),
        ("SELECT 1 -- comment; DROP\n", ["SELECT ?"]),
        # "--" without a following space is not a comment in MySQL: 1--1 is 1 - (-1).
        ("SELECT 1--1", ["SELECT ? -- ?"]),
        # Backslash escapes in both quote styles; "..." is a string.
        ("SELECT 'a\\'; DROP TABLE t; --'", ["SELECT ?"]),
        ('SELECT "a\\"; DROP TABLE t; --"', ["SELECT ?"]),
        ("SELECT 'it''s'", ["SELECT ?"]),
        # Versioned comments are SQL to the server: their content is lexed, markers dropped.
        ("/*!40101 SET NAMES utf8 */; /*!50000 DROP TABLE t */", ["SET NAMES UTF8", "DROP TABLE T"]),
        ("SELECT /*+ MAX_EXECUTION_TIME(1) */ 1", ["SELECT ?"]),
        ("SELECT /* ; */ 1", ["SELECT ?"]),
        ("SELECT @a, @@session.sql_mode, ?", ["SELECT @a , @@session.sql_mode , ?"]),
        # $ quoting is PostgreSQL only.
        ("SELECT 1", ["SELECT ?"]),
    ],
)
def test_mysql_split(sql: str, expected: list[str]) -> None:
    assert digests(sql, "mysql") == expected


def test_mysql_no_backslash_escapes() -> None:
    assert digests("SELECT 'a\\'; DROP TABLE t", "mysql", backslash_escapes=False) == ["SELECT ?", "DROP TABLE T"]


def test_tokens_keep_raw_text_and_quoted_names() -> None:
    (st,) = split('SELECT "MyTab".Col, \'x\' FROM s."T"')
    kinds = [(k, n) for k, n, _ in st.tokens]
    assert (QIDENT, "MyTab") in kinds
    assert (WORD, "COL") in kinds
    assert [raw for k, _, raw in st.tokens if k == LITERAL] == ["'x'"]
    assert st.text == 'SELECT "MyTab".Col, \'x\' FROM s."T"'


def test_statement_text_slices() -> None:
    sts = split("  SELECT 1 ; /* c */ SELECT 2  ")
    assert [s.text for s in sts] == ["SELECT 1 ", "/* c */ SELECT 2  "]


def test_digest_distinguishes_quoted_names() -> None:
    # The cache is keyed by digest: names must not collide after normalisation.
    assert digests('SELECT * FROM "a b"') != digests("SELECT * FROM a b")
    assert digests('SELECT * FROM "a.b"') != digests("SELECT * FROM a.b")
    assert digests('SELECT * FROM "T"') != digests("SELECT * FROM t")
    assert digests("SELECT * FROM T") == digests("select * from t")
