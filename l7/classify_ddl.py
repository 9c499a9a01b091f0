"""Classification rules for DDL and utility statements with a kind and a list of names.

CREATE/ALTER/DROP (object kind, name, relations), TRUNCATE/LOCK/VACUUM-style table lists,
GRANT/REVOKE and MySQL LOAD DATA. Split from :mod:`l7.classify` only to keep modules short;
these rules never recurse into a nested statement (that stays in classify).
"""

from __future__ import annotations

from l7.model import Dialect, Statement
from l7.sql_lexer import VARIABLE, Token
from l7.sql_tables import dedupe, punct_at, read_name, read_ref, scan, skip_parens, skip_words, strongest, word_at

_Toks = tuple[Token, ...]

# Words between CREATE/ALTER/DROP and the object kind.
_DDL_MODIFIERS = frozenset(
    {
        "OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL", "UNIQUE", "RECURSIVE",
        "TRUSTED", "PROCEDURAL", "ONLINE", "OFFLINE", "IGNORE", "FULLTEXT", "SPATIAL", "CONSTRAINT",
        "DEFAULT", "AGGREGATE", "UNDEFINED", "MERGE", "TEMPTABLE", "SQL", "SECURITY", "DEFINER", "INVOKER",
        "ALGORITHM",
    }
)  # fmt: skip
# Kinds spelled in two or three words.
_KIND_PREFIX = {
    "MATERIALIZED": ("VIEW",), "FOREIGN": ("TABLE", "DATA"), "EVENT": ("TRIGGER",), "TEXT": ("SEARCH",),
    "ACCESS": ("METHOD",), "USER": ("MAPPING",), "OPERATOR": ("CLASS", "FAMILY"), "DEFAULT": ("PRIVILEGES",),
    "LOGFILE": ("GROUP",), "RESOURCE": ("GROUP",), "SPATIAL": ("REFERENCE",),
}  # fmt: skip
RELATION_KINDS = frozenset({"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE", "SEQUENCE", "TABLES"})
_NAMED_KINDS = frozenset({"INDEX", "TRIGGER", "RULE", "POLICY", "STATISTICS"})  # ... ON table


def ddl_kind(toks: _Toks, i: int) -> tuple[str | None, int]:
    i = skip_words(toks, i, _DDL_MODIFIERS)
    while punct_at(toks, i) == "=":  # MySQL DEFINER = `user`@`host`, ALGORITHM = MERGE
        i += 2
        while i < len(toks) and toks[i][0] == VARIABLE:
            i += 1
        i = skip_words(toks, i, _DDL_MODIFIERS)
    kind = word_at(toks, i)
    if not kind:
        return None, i
    i += 1
    follow = _KIND_PREFIX.get(kind)
    while follow and word_at(toks, i) in follow:
        kind = f"{kind} {word_at(toks, i)}"
        i += 1
        follow = ("WRAPPER",) if kind == "FOREIGN DATA" else None
    return kind, i


def ddl(verb: str, toks: _Toks, dialect: Dialect) -> Statement:
    """CREATE/ALTER/DROP/TRUNCATE/LOCK/VACUUM-style: object kind, its name, tables."""
    n = len(toks)
    kind, i = ddl_kind(toks, 1)
    i = skip_words(toks, i, {"CONCURRENTLY", "IF", "NOT", "EXISTS", "ONLY"})
    tables: list[str] = []
    verbs = [verb]
    name, j = read_name(toks, i, n)
    if kind in RELATION_KINDS:
        more: str | None = name
        while more is not None:
            tables.append(more)
            if verb != "DROP" or punct_at(toks, j) != ",":
                break
            more, j = read_name(toks, j + 1, n)
        # CREATE TABLE t AS SELECT / CREATE VIEW v AS ... : the query's tables too. An ALTER's
        # or a DROP's tail names only columns and constraints, except REFERENCES other.
        if verb == "CREATE":
            scan(toks, j, n, tables, verbs)
        for k in range(j, n - 1):
            if word_at(toks, k) in ("REFERENCES", "LIKE"):
                read_ref(toks, k + 1, n, tables, allow_call=True)
    elif kind in _NAMED_KINDS:
        for k in range(i, n - 1):
            if word_at(toks, k) == "ON":
                read_ref(toks, skip_words(toks, k + 1, {"ONLY", "TABLE"}), n, tables, allow_call=True)
                break
    return Statement(
        verb,
        tables=dedupe(tables),
        command=verb,
        verbs=strongest(verbs),
        object_kind=kind,
        name=name,
    )


def table_list(verb: str, toks: _Toks, i: int, skip: frozenset[str] | set[str], kind: str | None = None) -> Statement:
    """TRUNCATE a, b / LOCK TABLE a, b / VACUUM a, b / ANALYZE a: a comma-separated list."""
    n = len(toks)
    tables: list[str] = []
    while True:
        i = skip_words(toks, i, skip)
        if punct_at(toks, i) == "(":  # VACUUM (VERBOSE, ANALYZE) t
            i = skip_parens(toks, i, n)
            continue
        name, i = read_name(toks, i, n)
        if name is None:
            break
        tables.append(name)
        if punct_at(toks, i) == "(":  # ANALYZE t (col, ...)
            i = skip_parens(toks, i, n)
        if punct_at(toks, i) == "*":
            i += 1
        if punct_at(toks, i) != ",":
            break
        i += 1
    return Statement(verb, tables=dedupe(tables), command=verb, verbs=(verb,), object_kind=kind)


def grant(verb: str, toks: _Toks) -> Statement:
    """GRANT/REVOKE privileges ON [kind] objects TO/FROM roles; GRANT role TO user has no ON."""
    n = len(toks)
    for k in range(1, n):
        if word_at(toks, k) == "ON":
            i = k + 1
            kind = "TABLE"
            w = word_at(toks, i)
            if w == "ALL" and word_at(toks, i + 1) in ("TABLES", "SEQUENCES", "FUNCTIONS", "PROCEDURES", "ROUTINES"):
                return Statement(verb, command=verb, verbs=(verb,), object_kind=f"ALL {word_at(toks, i + 1)}")
            if w in ("TABLE", "SEQUENCE", "SCHEMA", "DATABASE", "FUNCTION", "PROCEDURE", "ROUTINE", "TYPE",
                     "DOMAIN", "LANGUAGE", "TABLESPACE", "FOREIGN", "LARGE", "PARAMETER"):  # fmt: skip
                kind = w
                i += 1
            tables: list[str] = []
            while kind in ("TABLE", "SEQUENCE"):
                name, i = read_name(toks, i, n)
                if name is None:
                    break
                if punct_at(toks, i) == "." and punct_at(toks, i + 1) == "*":  # MySQL db.*
                    name, i = name + ".*", i + 2
                tables.append(name)
                if punct_at(toks, i) != ",":
                    break
                i += 1
            return Statement(verb, tables=dedupe(tables), command=verb, verbs=(verb,), object_kind=kind)
    return Statement(verb, command=verb, verbs=(verb,), object_kind="ROLE")


def load(toks: _Toks) -> Statement:
    """MySQL LOAD DATA|XML [LOCAL] INFILE 'f' [REPLACE|IGNORE] INTO TABLE t; PostgreSQL LOAD 'lib'."""
    kind = word_at(toks, 1) or None
    tables: list[str] = []
    for k in range(1, len(toks) - 1):
        if word_at(toks, k) == "INTO":
            read_ref(toks, skip_words(toks, k + 1, {"TABLE"}), len(toks), tables)
            break
    return Statement("LOAD", tables=tuple(tables), command="LOAD", verbs=("LOAD",), object_kind=kind, direction="FROM")
