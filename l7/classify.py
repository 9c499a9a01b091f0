"""Statement classification: SQL text -> list of :class:`~l7.model.Statement`.

Flow: :func:`l7.sql_lexer.split` turns the text into statements, each with a digest (comments
dropped, literals ``?``, words upper-cased, quoted identifiers kept); the digest is looked up
in a bounded LRU (:mod:`l7.digest_cache`); on a miss the token rules below classify it.

Design question: is this fast path a full classifier, or does sqlparse run on each miss?
It is a full classifier, and sqlparse is only the test oracle (a test-extra dependency), for
three measured reasons:

* Cost per distinct statement. sqlparse ``parse()`` + ``get_type()`` measured 400-900 us per
  pgbench statement here (~630 us on the ``bench/classify.py`` mix), against ~35 us for this
  module uncached (25-75 us by statement) and ~14 us on a cache hit. A cache only helps when
  digests repeat; ad-hoc reporting queries, generated SQL and a client varying identifiers
  all miss, and ~1 ms of CPU per miss on the proxy's event loop stalls every connection on it.
* Correctness on exactly the cases that matter. sqlparse's ``get_type()`` says SELECT for
  ``WITH d AS (DELETE ...) SELECT``, UNKNOWN for ``EXPLAIN ANALYZE DELETE``, SELECT for
  ``SELECT ... INTO t``, and has no opinion on COPY/GRANT/CALL/SET/BEGIN. Running it on a
  miss would still need all the rules here, plus a way to merge two opinions.
* It does not give tables, object kinds, COPY direction or prepared-statement names.

A hit still lexes the whole statement (the digest is the cache key), so ~14 us is the floor of
this design; nearly all of it is ``re.finditer`` creating one match object per token (~0.5 us
each). At pgbench's ~50k statements/s that is most of a core: the next step, if the proxy
needs it, is a cheaper cache key (see the README), not a faster classifier.

So the runtime has no dependency on sqlparse; ``tests/l7/test_classify.py`` checks that the
two agree on a generated corpus wherever sqlparse has an opinion, and lists where it is wrong.

Classification is a pure function of the digest (tables are kept in it; literals never change
the verb), so caching by digest is safe. The exceptions are not cached: MySQL
``PREPARE s FROM 'text'`` (the inner SQL is a literal) and ``EXECUTE p`` (its meaning is
per-connection state; see :mod:`l7.sql_session`).
"""

from __future__ import annotations

from dataclasses import replace

from l7.classify_ddl import RELATION_KINDS, ddl, ddl_kind, grant, load, table_list
from l7.digest_cache import DigestCache
from l7.model import VERB_PRECEDENCE, Dialect, Statement
from l7.sql_lexer import LITERAL, PUNCT, QIDENT, VARIABLE, WORD, Token, skeleton, split
from l7.sql_tables import (
    dedupe,
    name_part,
    punct_at,
    read_name,
    read_ref,
    scan,
    skip_parens,
    skip_words,
    strongest,
    word_at,
)

_Toks = tuple[Token, ...]

_DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE"})
# Leading keywords that are their own verb, with no tables to read.
_PLAIN = frozenset(
    {
        "SHOW", "RESET", "SAVEPOINT", "RELEASE", "LISTEN", "NOTIFY", "UNLISTEN", "DISCARD", "CHECKPOINT",
        "FETCH", "MOVE", "CLOSE", "USE", "FLUSH", "KILL", "HANDLER", "LOAD", "DO", "CALL", "SECURITY",
        "REASSIGN", "IMPORT", "XA", "INSTALL", "UNINSTALL", "PURGE", "SHUTDOWN", "HELP", "UNLOCK",
    }
)  # fmt: skip
_ALIASES = {
    "START": "BEGIN", "END": "COMMIT", "ABORT": "ROLLBACK", "DESCRIBE": "EXPLAIN", "DESC": "EXPLAIN",
    "ANALYSE": "ANALYZE", "VALUES": "SELECT", "TABLE": "SELECT",
}  # fmt: skip
_TX = frozenset({"BEGIN", "COMMIT", "ROLLBACK"})


def _query(verb: str, toks: _Toks, start: int, command: str, exclude: set[str] | None = None) -> Statement:
    """A DML statement (or query) from ``start``: main verb plus any verbs embedded in it."""
    tables: list[str] = []
    found: list[str] = [verb]
    if verb in ("INSERT", "REPLACE"):
        # MySQL allows INSERT t / REPLACE t without INTO, and modifiers before it.
        i = skip_words(toks, start + 1, {"LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE"})
        if word_at(toks, i) != "INTO":
            read_ref(toks, i, len(toks), tables, allow_call=True)
    elif verb == "DELETE":
        # MySQL multi-table DELETE t1, t2 FROM ...: the targets come first.
        i = skip_words(toks, start + 1, {"LOW_PRIORITY", "QUICK", "IGNORE"})
        while word_at(toks, i) != "FROM" and (toks[i][0] in (WORD, QIDENT) if i < len(toks) else False):
            name, i = read_name(toks, i, len(toks))
            if name is not None:
                tables.append(name)
            if punct_at(toks, i) in (",", ".") or punct_at(toks, i) == "*":
                i += 1
    scan(toks, start, len(toks), tables, found)
    direction = None
    kind = None
    if verb == "SELECT":
        kind, direction = _select_into(toks, start)
        if kind == "TABLE":
            found.insert(0, "CREATE")
    verbs = strongest(found)
    main = "CREATE" if kind == "TABLE" else verbs[0]
    return Statement(
        verb=main,
        tables=dedupe(tables, exclude or set()),
        command=command,
        verbs=verbs,
        object_kind=kind,
        direction=direction,
    )


def _select_into(toks: _Toks, start: int) -> tuple[str | None, str | None]:
    """SELECT ... INTO at depth 0: PostgreSQL creates a table; MySQL INTO OUTFILE writes a file."""
    depth = 0
    for i in range(start, len(toks)):
        kind, norm = toks[i][0], toks[i][1]
        if kind == PUNCT:
            depth += norm == "("
            depth -= norm == ")"
        elif kind == WORD and norm == "INTO" and depth == 0:
            nxt = word_at(toks, i + 1)
            if nxt in ("OUTFILE", "DUMPFILE"):
                return None, "TO"
            if i + 1 < len(toks) and toks[i + 1][0] in (WORD, QIDENT):
                return "TABLE", None
            return None, None
    return None, None


def _with(toks: _Toks, dialect: Dialect) -> Statement:
    """WITH [RECURSIVE] name [(cols)] AS [[NOT] MATERIALIZED] (body), ... main-statement."""
    n = len(toks)
    i = skip_words(toks, 1, {"RECURSIVE"})
    ctes: set[str] = set()
    while i < n:
        if toks[i][0] in (WORD, QIDENT):
            ctes.add(name_part(toks[i]))
            i += 1
        if punct_at(toks, i) == "(":
            i = skip_parens(toks, i, n)
        i = skip_words(toks, i, {"AS", "NOT", "MATERIALIZED"})
        if punct_at(toks, i) == "(":
            i = skip_parens(toks, i, n)
        # SEARCH/CYCLE clauses run until the comma or the main statement.
        while (
            i < n
            and punct_at(toks, i) != ","
            and word_at(toks, i) not in _DML
            and word_at(toks, i) not in ("VALUES", "TABLE")
        ):
            i = skip_parens(toks, i, n) if punct_at(toks, i) == "(" else i + 1
        if punct_at(toks, i) != ",":
            break
        i += 1
    main_verb = _ALIASES.get(word_at(toks, i), word_at(toks, i)) if i < n else "SELECT"
    if main_verb not in _DML:
        main_verb = "SELECT"
    st = _query(main_verb, toks, i, "WITH", exclude=ctes) if i < n else _query("SELECT", toks, 0, "WITH", ctes)
    # The CTE bodies are part of the statement too: scan everything for tables and verbs.
    tables: list[str] = list(st.tables)
    found: list[str] = list(st.verbs)
    scan(toks, 0, n, tables, found)
    verbs = strongest(found)
    return replace(st, tables=dedupe(tables, ctes), verbs=verbs, verb=st.verb if st.verb == "CREATE" else verbs[0])


def _explain(toks: _Toks, dialect: Dialect) -> Statement:
    """EXPLAIN [ANALYZE] [VERBOSE] stmt | EXPLAIN (opt [value], ...) stmt; MySQL FORMAT=x."""
    n = len(toks)
    i = 1
    analyze = False
    while i < n:
        w = word_at(toks, i)
        if w in ("ANALYZE", "ANALYSE"):
            analyze = True
            i += 1
        elif w in ("VERBOSE", "EXTENDED", "PARTITIONS"):
            i += 1
        elif w == "FORMAT" and punct_at(toks, i + 1) == "=":
            i += 3
        elif punct_at(toks, i) == "(" and word_at(toks, i + 1) not in _DML and word_at(toks, i + 1) != "WITH":
            end = skip_parens(toks, i, n)
            j = i + 1
            while j < end - 1:
                if word_at(toks, j) in ("ANALYZE", "ANALYSE"):
                    # Only the words FALSE/OFF switch it off. A literal ('off', 0) is "?" in the
                    # digest, so reading it would make the cached answer depend on which literal
                    # came first; assume it runs (over-report rather than under-report).
                    analyze = word_at(toks, j + 1) not in ("FALSE", "OFF")
                j += 1
            i = end
        else:
            break
    if i >= n:
        return Statement("EXPLAIN", command="EXPLAIN", verbs=("EXPLAIN",))
    inner = _classify_tokens(toks[i:], dialect)
    if inner.verb == "OTHER":
        # MySQL EXPLAIN t / DESCRIBE t describes a table.
        name, _ = read_name(toks, i, n)
        tables = (name,) if name is not None else ()
        return Statement("EXPLAIN", tables=tables, command="EXPLAIN", verbs=("EXPLAIN",))
    if analyze:
        # ANALYZE runs the statement: it does what the statement does.
        return replace(inner, command="EXPLAIN", inner=inner)
    return Statement("EXPLAIN", tables=inner.tables, command="EXPLAIN", verbs=("EXPLAIN",), inner=inner)


def _copy(toks: _Toks, dialect: Dialect) -> Statement:
    """COPY table [(cols)] FROM|TO ... | COPY (query) TO ...: a query may be DML ... RETURNING."""
    n = len(toks)
    tables: list[str] = []
    verbs = ["COPY"]
    i = 1
    inner = None
    if punct_at(toks, i) == "(":
        end = skip_parens(toks, i, n)
        inner = _classify_tokens(toks[i + 1 : end - 1], dialect)
        tables.extend(inner.tables)
        verbs.extend(inner.verbs)
        i = end
    else:
        name, i = read_name(toks, i, n)
        if name is not None:
            tables.append(name)
        if punct_at(toks, i) == "(":
            i = skip_parens(toks, i, n)
    direction = word_at(toks, i) if word_at(toks, i) in ("FROM", "TO") else None
    ranked = strongest(verbs)
    # A COPY of a DELETE ... RETURNING deletes: the strongest DML verb wins over COPY.
    verb = ranked[0] if ranked[0] in VERB_PRECEDENCE and ranked[0] != "SELECT" else "COPY"
    return Statement(verb, tables=dedupe(tables), command="COPY", verbs=ranked, direction=direction, inner=inner)


def _prepare(toks: _Toks, dialect: Dialect) -> Statement:
    """PREPARE name [(types)] AS stmt (PostgreSQL) | PREPARE name FROM 'text' (MySQL)."""
    n = len(toks)
    if word_at(toks, 1) == "TRANSACTION" and n > 2 and toks[2][0] == LITERAL:  # two-phase commit
        return Statement("PREPARE", command="PREPARE", verbs=("PREPARE",), object_kind="TRANSACTION")
    name = name_part(toks[1]) if n > 1 and toks[1][0] in (WORD, QIDENT) else None
    i = 2
    if punct_at(toks, i) == "(":
        i = skip_parens(toks, i, n)
    inner = None
    if word_at(toks, i) in ("AS", "FROM"):
        if i + 1 < n and toks[i + 1][0] == LITERAL:
            inner = _classify_literal(toks[i + 1][2], dialect)
        elif i + 1 < n and toks[i + 1][0] != VARIABLE:  # MySQL FROM @var: text unknown here
            inner = _classify_tokens(toks[i + 1 :], dialect)
    tables = inner.tables if inner is not None else ()
    return Statement("PREPARE", tables=tables, command="PREPARE", verbs=("PREPARE",), name=name, inner=inner)


def _classify_literal(raw: str, dialect: Dialect) -> Statement | None:
    """Classify the SQL inside a MySQL string literal (PREPARE s FROM '...')."""
    if raw[:1] not in ("'", '"'):
        return None
    q = raw[0]
    text = raw[1:-1] if len(raw) > 1 and raw.endswith(q) else raw[1:]
    text = text.replace(q + q, q).replace("\\" + q, q).replace("\\\\", "\\")
    stmts = classify(text, dialect)
    return stmts[0] if len(stmts) == 1 else None


def _named(verb: str, toks: _Toks, i: int) -> Statement:
    name = name_part(toks[i]) if i < len(toks) and toks[i][0] in (WORD, QIDENT) else None
    return Statement(verb, command=verb, verbs=(verb,), name=name)


def _classify_tokens(toks: _Toks, dialect: Dialect) -> Statement:
    """Classify one statement's tokens (no digest, no cache)."""
    i = 0
    while punct_at(toks, i) == "(":  # (SELECT ...) UNION (SELECT ...)
        i += 1
    first = word_at(toks, i)
    if not first:
        return Statement("OTHER")
    verb = _ALIASES.get(first, first)
    if first == "TABLE":  # TABLE t == SELECT * FROM t
        st = _query("SELECT", toks, i, first)
        name, _ = read_name(toks, i + 1, len(toks))
        return replace(st, tables=(name,) if name else ())
    if verb in _DML:
        return _query(verb, toks, i, first)
    if i:
        return Statement("OTHER")
    if first == "WITH":
        return _with(toks, dialect)
    if verb == "EXPLAIN":
        return _explain(toks, dialect)
    if verb in ("CREATE", "ALTER", "DROP"):
        if verb == "DROP" and word_at(toks, 1) == "PREPARE":  # MySQL DROP PREPARE s
            return _named("DEALLOCATE", toks, 2)
        return ddl(verb, toks, dialect)
    if verb == "TRUNCATE":
        return table_list(verb, toks, 1, {"TABLE", "ONLY"})
    if verb == "LOCK":
        return table_list(verb, toks, 1, {"TABLE", "TABLES", "ONLY"})
    if verb in ("VACUUM", "ANALYZE", "CLUSTER", "OPTIMIZE", "REPAIR", "CHECKSUM"):
        return table_list(verb, toks, 1, {"FULL", "FREEZE", "VERBOSE", "ANALYZE", "ANALYSE", "NO_WRITE_TO_BINLOG",
                                           "LOCAL", "TABLE", "SKIP_LOCKED"})  # fmt: skip
    if verb == "RENAME":  # MySQL RENAME TABLE a TO b, c TO d
        tables: list[str] = []
        for k in range(1, len(toks)):
            if (
                toks[k][0] in (WORD, QIDENT)
                and word_at(toks, k) not in ("TABLE", "TO")
                and punct_at(toks, k - 1) != "."
            ):
                name, _ = read_name(toks, k, len(toks))
                if name:
                    tables.append(name)
        return Statement("RENAME", tables=dedupe(tables), command="RENAME", verbs=("RENAME",), object_kind="TABLE")
    if verb in ("REINDEX", "REFRESH", "COMMENT"):
        # REINDEX TABLE t / REFRESH MATERIALIZED VIEW v / COMMENT ON TABLE t IS '...'
        j = 2 if verb == "COMMENT" else 1
        kind, j = ddl_kind(toks, j)
        j = skip_words(toks, j, {"CONCURRENTLY"})
        name, _ = read_name(toks, j, len(toks))
        tables = [name] if name and kind in RELATION_KINDS else []
        return Statement(verb, tables=tuple(tables), command=verb, verbs=(verb,), object_kind=kind, name=name)
    if verb in ("GRANT", "REVOKE"):
        return grant(verb, toks)
    if verb == "COPY":
        return _copy(toks, dialect)
    if verb == "LOAD":
        return load(toks)
    if verb == "PREPARE":
        return _prepare(toks, dialect)
    if verb == "EXECUTE":
        return _named("EXECUTE", toks, 1)
    if verb == "DEALLOCATE":
        if word_at(toks, 1) == "ALL" or (word_at(toks, 1) == "PREPARE" and word_at(toks, 2) == "ALL"):
            return Statement("DEALLOCATE", command=first, verbs=("DEALLOCATE",), object_kind="ALL")
        return _named("DEALLOCATE", toks, 2 if word_at(toks, 1) == "PREPARE" else 1)
    if verb in _TX:
        return Statement(verb, command=first, verbs=(verb,))
    if verb == "DECLARE":  # DECLARE c [BINARY] [NO] SCROLL CURSOR [WITH HOLD] FOR query
        for k in range(2, len(toks)):
            if word_at(toks, k) == "FOR":
                inner = _classify_tokens(toks[k + 1 :], dialect)
                return Statement("DECLARE", tables=inner.tables, command="DECLARE", verbs=("DECLARE",),
                                 name=name_part(toks[1]), inner=inner)  # fmt: skip
        return _named("DECLARE", toks, 1)
    if verb == "SET":
        # SET [SESSION|LOCAL|GLOBAL] name ...; MySQL SET @v = (SELECT ...) may read tables.
        j = skip_words(toks, 1, {"SESSION", "LOCAL", "GLOBAL", "PERSIST"})
        name = name_part(toks[j]) if j < len(toks) and toks[j][0] in (WORD, QIDENT) else None
        tables = []
        scan(toks, j, len(toks), tables, [])
        return Statement("SET", tables=dedupe(tables), command="SET", verbs=("SET",), name=name)
    if verb in _PLAIN:
        return Statement(verb, command=first, verbs=(verb,))
    return Statement("OTHER", command=first)


def classify_uncached(
    sql: str, dialect: Dialect = "postgres", *, backslash_escapes: bool | None = None
) -> list[Statement]:
    """Classify every statement in ``sql`` without the digest cache (tests, benchmarks)."""
    out = []
    for lexed in split(sql, dialect, backslash_escapes=backslash_escapes):
        out.append(replace(_classify_tokens(lexed.tokens, dialect), digest=lexed.digest))
    return out


class SqlClassifier:
    """Digest-cached classification for one dialect (and one string-escaping mode)."""

    def __init__(self, dialect: Dialect = "postgres", *, cache_size: int = 4096, backslash_escapes: bool | None = None):
        self.dialect: Dialect = dialect
        self.backslash_escapes = backslash_escapes
        self.cache: DigestCache[Statement] = DigestCache(cache_size)
        # First level: whole texts by skeleton (sql_lexer.skeleton), which spares the lexer
        # for queries that differ from an earlier one only in literals.
        self.texts: DigestCache[tuple[Statement, ...]] = DigestCache(cache_size)

    @property
    def hits(self) -> int:
        """Lookups answered from a cache (by skeleton, or by digest after lexing)."""
        return self.texts.hits + self.cache.hits

    @property
    def misses(self) -> int:
        """Statements that had to be classified from their tokens."""
        return self.cache.misses

    def classify(self, sql: str) -> list[Statement]:
        key = skeleton(sql, self.dialect)
        if key is not None:
            known = self.texts.get(key)
            if known is not None:
                return list(known)
            self.texts.misses -= 1  # counted below, by the digest cache, if it comes to that
        out = self._classify(sql)
        if key is not None:
            self.texts.put(key, tuple(out))
        return out

    def _classify(self, sql: str) -> list[Statement]:
        out = []
        cache = self.cache
        for lexed in split(sql, self.dialect, backslash_escapes=self.backslash_escapes):
            st = cache.get(lexed.digest)
            if st is None:
                st = replace(_classify_tokens(lexed.tokens, self.dialect), digest=lexed.digest)
                # MySQL PREPARE s FROM 'text' depends on a literal, which the digest does not keep.
                toks = lexed.tokens
                if not (len(toks) == 4 and toks[0][1] == "PREPARE" and toks[3][0] == LITERAL):
                    cache.put(lexed.digest, st)
            out.append(st)
        return out


_DEFAULT: dict[str, SqlClassifier] = {}


def classify(sql: str, dialect: Dialect = "postgres") -> list[Statement]:
    """Classify every statement in ``sql``; never raises. Uses a shared per-dialect cache."""
    clf = _DEFAULT.get(dialect)
    if clf is None:
        clf = _DEFAULT[dialect] = SqlClassifier(dialect)
    try:
        return clf.classify(sql)
    except Exception:  # a classifier bug must not take down the connection; fail as OTHER
        return [Statement("OTHER")]
