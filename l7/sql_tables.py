"""Table references and embedded data-modifying verbs, read from a token list.

No grammar: a single left-to-right scan that knows the handful of places a table name can
follow (FROM, JOIN, USING, INTO, a leading UPDATE, a comma inside a FROM list) and the few
places those keywords mean something else (``EXTRACT(x FROM y)``, ``IS DISTINCT FROM``,
``FOR UPDATE``, ``ON CONFLICT DO UPDATE``, MySQL ``ON DUPLICATE KEY UPDATE``). Subqueries need
no recursion: their FROM clauses are seen by the same scan. Over-reporting a name is preferred
to missing one, because a policy that denies a table must see every use of it.
"""

from __future__ import annotations

from l7.model import VERB_PRECEDENCE
from l7.sql_lexer import LITERAL, PUNCT, QIDENT, WORD, Token

# SQL-standard functions whose argument syntax uses FROM (not a table reference inside them).
_FROM_FUNCTIONS = frozenset({"EXTRACT", "SUBSTRING", "TRIM", "POSITION", "OVERLAY", "SUBSTR"})
# Keywords that end a FROM/USING/UPDATE list at their paren depth.
_LIST_END = frozenset(
    {
        "WHERE", "GROUP", "HAVING", "WINDOW", "ORDER", "LIMIT", "OFFSET", "FETCH", "FOR", "UNION",
        "INTERSECT", "EXCEPT", "RETURNING", "SET", "VALUES", "SELECT", "WHEN", "INTO", "PROCEDURE",
        "LOCK",
    }
)  # fmt: skip
_REF_SKIP = frozenset({"ONLY", "LATERAL", "LOW_PRIORITY", "IGNORE", "QUICK", "TEMP", "TEMPORARY", "UNLOGGED"})
_NOT_TABLES = frozenset({"OUTFILE", "DUMPFILE", "SELECT", "VALUES", "WITH", "DEFAULT", "TABLE", "STDIN", "STDOUT"})


def name_part(tok: Token) -> str:
    """Normalise one identifier: unquoted names fold to lower case, quoted ones stay."""
    return tok[2].lower() if tok[0] == WORD else tok[1]


def read_name(toks: tuple[Token, ...], i: int, end: int) -> tuple[str | None, int]:
    """Read ``a``, ``a.b`` or ``a.b.c`` starting at ``i``; return (name or None, next index)."""
    if i >= end or toks[i][0] not in (WORD, QIDENT):
        return None, i
    parts = [name_part(toks[i])]
    i += 1
    while i + 1 < end and toks[i][1] == "." and toks[i + 1][0] in (WORD, QIDENT):
        parts.append(name_part(toks[i + 1]))
        i += 2
    return ".".join(parts), i


def skip_parens(toks: tuple[Token, ...], i: int, end: int) -> int:
    """``toks[i]`` is ``(``: return the index after its matching ``)`` (or ``end``)."""
    depth = 0
    while i < end:
        norm = toks[i][1]
        if toks[i][0] == PUNCT:
            if norm == "(":
                depth += 1
            elif norm == ")":
                depth -= 1
                if depth == 0:
                    return i + 1
        i += 1
    return end


def read_ref(toks: tuple[Token, ...], i: int, end: int, out: list[str], *, allow_call: bool = False) -> int:
    """Read one table reference at ``i`` into ``out``; a function call (``f(...)``) is not one."""
    while i < end and toks[i][0] == WORD and toks[i][1] in _REF_SKIP:
        i += 1
    if i < end and toks[i][0] == WORD and toks[i][1] in _NOT_TABLES:
        return i
    if i + 1 < end and toks[i][1] == "ROWS" and toks[i + 1][1] == "FROM" and toks[i][0] == WORD:
        return i + 1  # FROM ROWS FROM (f(), g()): functions, not a table named rows
    name, j = read_name(toks, i, end)
    if name is None:
        return i
    if not allow_call and j < end and toks[j][1] == "(" and toks[j][0] == PUNCT:
        return j
    out.append(name)
    return j


def _starts_dml(word: str, nxt: str) -> bool:
    """DELETE FROM / INSERT INTO / MERGE INTO anywhere (a CTE body, COPY (...)) is a DML verb."""
    if word == "DELETE":
        return nxt in ("FROM", "LOW_PRIORITY", "QUICK", "IGNORE")
    return word in ("INSERT", "MERGE", "REPLACE") and nxt == "INTO"


def scan(toks: tuple[Token, ...], start: int, end: int, tables: list[str], verbs: list[str]) -> None:
    """Append the tables named in ``toks[start:end]`` and any DML verbs met inside it."""
    depth = 0
    in_list: set[int] = set()  # depths whose FROM/USING/UPDATE list is still open
    in_func: set[int] = set()  # depths opened by EXTRACT( and friends
    prev: Token | None = None
    i = start
    while i < end:
        tok = toks[i]
        kind, norm = tok[0], tok[1]
        if kind == PUNCT:
            if norm == "(":
                depth += 1
                if prev is not None and prev[0] == WORD and prev[1] in _FROM_FUNCTIONS:
                    in_func.add(depth)
            elif norm == ")":
                in_list.discard(depth)
                in_func.discard(depth)
                depth -= 1
            elif norm == "," and depth in in_list:
                prev = tok
                i = read_ref(toks, i + 1, end, tables)
                continue
        elif kind == WORD:
            nxt = toks[i + 1] if i + 1 < end else None
            if norm in ("FROM", "JOIN", "USING", "STRAIGHT_JOIN"):
                if norm == "FROM" and (depth in in_func or (prev is not None and prev[1] == "DISTINCT")):
                    pass
                else:
                    in_list.add(depth)
                    prev = tok
                    i = read_ref(toks, i + 1, end, tables)
                    continue
            elif norm == "INTO":
                in_list.discard(depth)
                prev = tok
                i = read_ref(toks, i + 1, end, tables, allow_call=True)
                continue
            elif norm == "UPDATE" and (prev is None or prev[1] in ("(", ")")) and nxt is not None:
                if nxt[0] in (WORD, QIDENT):
                    verbs.append("UPDATE")
                    in_list.add(depth)
                    prev = tok
                    i = read_ref(toks, i + 1, end, tables)
                    continue
            elif nxt is not None and nxt[0] == WORD and _starts_dml(norm, nxt[1]):
                verbs.append(norm)
            if norm in _LIST_END:
                in_list.discard(depth)
        elif kind == LITERAL:
            pass
        prev = tok
        i += 1


# --- small token helpers shared by the classifier modules ---------------------------------


def word_at(toks: tuple[Token, ...], i: int) -> str:
    """The upper-cased word at ``i``, or "" for anything else (so callers need no bounds checks)."""
    return toks[i][1] if i < len(toks) and toks[i][0] == WORD else ""


def punct_at(toks: tuple[Token, ...], i: int) -> str:
    return toks[i][1] if i < len(toks) and toks[i][0] == PUNCT else ""


def skip_words(toks: tuple[Token, ...], i: int, words: frozenset[str] | set[str]) -> int:
    while word_at(toks, i) in words and word_at(toks, i):
        i += 1
    return i


def dedupe(names: list[str], exclude: set[str] | frozenset[str] = frozenset()) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in names if n not in exclude))


def strongest(verbs: list[str]) -> tuple[str, ...]:
    """All verbs, strongest first (VERB_PRECEDENCE), others after in order of appearance."""
    seen = dict.fromkeys(verbs)
    ranked = [v for v in VERB_PRECEDENCE if v in seen]
    return tuple(ranked + [v for v in seen if v not in VERB_PRECEDENCE])
