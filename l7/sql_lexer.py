"""Fast SQL lexer and normaliser: query text -> statements -> (digest, tokens).

One compiled alternation per dialect is scanned with ``finditer``; the Python loop only
sees whole tokens (words, literals, punctuation), never single characters. The scanner is
restarted with ``finditer(text, pos)`` only for the one construct a regular expression cannot
match: PostgreSQL's *nested* block comments (``/* a /* b */ c */``). Plain comments, as ORMs
and sqlcommenter add to every query, stay on the fast path.

The lexer decides statement boundaries, so it must agree with the server about where strings,
identifiers and comments end; otherwise a ``;`` hidden from us (or invented by us) lets one
statement pass as another. The choices and why:

* ``;`` splits at any depth outside quotes and comments. The server rejects the whole query
  string on a syntax error (PostgreSQL parses all of a simple Query before running any of it),
  so over-splitting ``SELECT (1; DROP t)`` only reports more, never less.
* PostgreSQL ``'...'`` has no backslash escapes (``standard_conforming_strings`` is on by
  default since 9.1); ``E'...'`` has them. A session with the setting off must be lexed with
  ``backslash_escapes=True`` (the decoder sees the ParameterStatus), or ``'\\'; DROP ...``
  would split differently from the server.
* MySQL strings take backslash escapes unless ``NO_BACKSLASH_ESCAPES``; ``"..."`` is a string
  (not an identifier) unless ``ANSI_QUOTES``; ``#`` and ``-- `` (dash dash *space*) start
  comments (a ``--`` at the very end is taken as operators: nothing follows it either way);
  ``/*! ... */`` and ``/*M! ... */`` are comments whose content the server runs, so
  their content is lexed as SQL and only the markers are dropped.
* PostgreSQL 14+ ``CREATE FUNCTION ... BEGIN ATOMIC ...; ...; END`` bodies contain ``;`` that do
  not end the statement; we track ``BEGIN ATOMIC``/``CASE`` ... ``END`` depth like psql does.
* Unterminated strings, quoted identifiers, dollar quotes and comments run to the end of the
  text (the server would reject them; nothing after them can run).

A comment separates tokens (``DE/**/LETE`` is two words, a syntax error in PostgreSQL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Token kinds. Tokens are plain tuples (kind, norm, raw) because they are built for every
# statement on the hot path and tuple construction is the cheapest.
WORD = 0  # bare word: norm is upper-cased, raw as written
QIDENT = 1  # quoted identifier: norm is the unquoted, unescaped text
LITERAL = 2  # string or number: norm is "?", raw as written
PARAM = 3  # $1 (PostgreSQL), ? (MySQL)
PUNCT = 4  # ( ) , . ; and operators: norm == raw
VARIABLE = 5  # MySQL @user_var / @@system_var: norm as written

Token = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class LexedStatement:
    """One statement: its digest, tokens, and where it sits in the query text."""

    digest: str
    tokens: tuple[Token, ...]
    text: str  # the source slice (comments included), for logs and re-lexing


# Alternatives are tried in order for every token, so the frequent ones come first: words,
# punctuation, operators, numbers. A word must not start a prefixed string (E'x', B'1', X'f',
# N'x', U&'x', U&"x"): the lookahead hands those to the string alternatives. Operators never
# swallow the start of a comment ("+--x" is "+" then a comment).
_PG_HEAD = r"""
|(?P<word>(?![EeBbXxNn]'|[Uu]&['"])[^\W\d][\w$]*)
|(?P<num>0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
|(?P<punct>[(),.;\[\]]|::?)
|(?P<op>(?:[+*<>=~!@#%^&|`?]|-(?!-)|/(?!\*))+)
"""
# Strings: with standard_conforming_strings on, a backslash is an ordinary character.
_PG_STR = r"|(?P<str>(?:[BbXxNn]|[Uu]&)?'[^']*(?:''[^']*)*'?)"
_PG_STR_BS = r"|(?P<str>(?:[BbXxNn]|[Uu]&)?'[^'\\]*(?:(?:\\[\s\S]|'')[^'\\]*)*'?)"
_PG_TAIL = r"""
|(?P<qid>(?:[Uu]&)?"[^"]*(?:""[^"]*)*"?)
|(?P<estr>[Ee]'[^'\\]*(?:(?:\\[\s\S]|'')[^'\\]*)*'?)
|(?P<lc>--[^\n]*)
|(?P<bc>/\*[^*/]*(?:(?:\*(?!/)|/(?!\*))[^*/]*)*\*/)
|(?P<nest>/\*)
|(?P<param>\$\d+)
|(?P<dq>\$(?P<tag>(?:[^\W\d]\w*)?)\$[\s\S]*?\$(?P=tag)\$)
|(?P<dqu>\$(?:[^\W\d]\w*)?\$[\s\S]*)
|(?P<other>[\s\S])
"""

_MY_HEAD = r"""
|(?P<word>(?![NnXxBb]')[^\W\d][\w$]*)
|(?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
|(?P<punct>[(),.;])
|(?P<vclose>\*/)
|(?P<op>(?:[+*<>=~!%^&|:]|-(?!-\s)|/(?!\*))+)
"""
_MY_STR_BS = r"""
|(?P<str>(?:[NnXxBb])?'[^'\\]*(?:(?:\\[\s\S]|'')[^'\\]*)*'?|"[^"\\]*(?:(?:\\[\s\S]|"")[^"\\]*)*"?)
"""
_MY_STR = r"""
|(?P<str>(?:[NnXxBb])?'[^']*(?:''[^']*)*'?|"[^"]*(?:""[^"]*)*"?)
"""
_MY_TAIL = r"""
|(?P<qid>`[^`]*(?:``[^`]*)*`?)
|(?P<lc>(?:\#|--(?=\s))[^\n]*)
|(?P<vopen>/\*M?!\d*)
|(?P<bc>/\*[\s\S]*?(?:\*/|\Z))
|(?P<var>@@?(?:[\w$.]+|`(?:[^`]|``)*`?|'(?:[^'\\]|\\[\s\S]|'')*'?))
|(?P<param>\?)
|(?P<other>[\s\S])
"""
# Quoted text is matched "unrolled" (a run of ordinary characters, then any number of escape +
# run), never one character per alternation: the per-character form costs ~0.4 us a character,
# 7 s for a 17 MiB literal, and the event loop is blocked while it runs.
# Each match eats the whitespace before its token, so the Python loop runs once per token, not
# twice; "(?!)" never matches and only lets every alternative start with "|".
_WS = r"\s*(?:(?!)"
_WS_END = ")"

_NESTED_COMMENT = re.compile(r"/\*|\*/")


@lru_cache(maxsize=8)
def _master(dialect: str, backslash_escapes: bool) -> re.Pattern[str]:
    if dialect == "mysql":
        body = _WS + _MY_HEAD + (_MY_STR_BS if backslash_escapes else _MY_STR) + _MY_TAIL + _WS_END
    else:
        body = _WS + _PG_HEAD + (_PG_STR_BS if backslash_escapes else _PG_STR) + _PG_TAIL + _WS_END
    return re.compile(body, re.VERBOSE)


def _end_of_nested_comment(text: str, start: int) -> int:
    """Return the offset after the PostgreSQL comment opened at ``start`` (nesting counted)."""
    depth = 0
    for m in _NESTED_COMMENT.finditer(text, start):
        depth += 1 if m.group() == "/*" else -1
        if depth == 0:
            return m.end()
    return len(text)


def _unquote(raw: str) -> str:
    """Text of a quoted identifier: ``"a""b"`` -> ``a"b``, ``U&"x"`` -> ``x`` (escapes kept)."""
    if raw[0] in "Uu":
        raw = raw[2:]
    q = raw[0]
    inner = raw[1:-1] if len(raw) > 1 and raw[-1] == q else raw[1:]
    return inner.replace(q + q, q)


def split(sql: str, dialect: str = "postgres", *, backslash_escapes: bool | None = None) -> list[LexedStatement]:
    """Split ``sql`` into statements; empty statements (``;;``, comments only) are dropped.

    ``backslash_escapes`` defaults to the dialect's default (PostgreSQL: off, MySQL: on).
    """
    if backslash_escapes is None:
        backslash_escapes = dialect == "mysql"
    rx = _master(dialect, backslash_escapes)
    mysql = dialect == "mysql"
    out: list[LexedStatement] = []
    parts: list[str] = []
    toks: list[Token] = []
    seg_start = 0
    atomic = 0  # BEGIN ATOMIC / CASE ... END depth (PostgreSQL SQL-standard function bodies)

    def flush(end: int) -> None:
        if toks:
            # lstrip only: trailing blanks can belong to an unterminated quote at the very end.
            out.append(LexedStatement(" ".join(parts), tuple(toks), sql[seg_start:end].lstrip()))
        parts.clear()
        toks.clear()

    pos = 0
    while True:
        restart = -1
        for m in rx.finditer(sql, pos):
            kind = m.lastgroup
            raw = m.group(kind)  # type: ignore[arg-type]
            if kind == "word":
                up = raw.upper()
                if atomic:
                    if up == "END":
                        atomic -= 1
                    elif up == "CASE":
                        atomic += 1
                elif up == "ATOMIC" and toks and toks[-1][1] == "BEGIN" and toks[0][1] == "CREATE" and not mysql:
                    atomic = 1
                parts.append(up)
                toks.append((WORD, up, raw))
            elif kind == "punct":
                if raw == ";" and not atomic:
                    flush(m.start(kind))
                    seg_start = m.end()
                    continue
                parts.append(raw)
                toks.append((PUNCT, raw, raw))
            elif kind in ("num", "str", "estr", "dq", "dqu"):
                # Runs of literals in a list collapse ("IN (1, 2, 3)" == "IN (1)") so that
                # the digest cache does not fill with one entry per list length.
                if len(parts) >= 2 and parts[-1] == "," and parts[-2] in ("?", "?+"):
                    parts.pop()
                    parts[-1] = "?+"
                else:
                    parts.append("?")
                toks.append((LITERAL, "?", raw))
            elif kind == "qid":
                name = _unquote(raw)
                q = "`" if raw[0] == "`" else '"'
                parts.append(q + name.replace(q, q + q) + q)
                toks.append((QIDENT, name, raw))
            elif kind == "op" or kind == "other":
                if raw.isspace():  # trailing whitespace at the end of the text
                    continue
                parts.append(raw)
                toks.append((PUNCT, raw, raw))
            elif kind == "param":
                parts.append(raw)
                toks.append((PARAM, raw, raw))
            elif kind == "var":
                parts.append(raw)
                toks.append((VARIABLE, raw, raw))
            elif kind == "nest":
                restart = _end_of_nested_comment(sql, m.start(kind))
                break
            # lc, bc, vopen, vclose: comments and versioned-comment markers are dropped.
        if restart < 0:
            break
        pos = restart
    flush(len(sql))
    return out


# --- skeleton: a cheaper cache key for the common case ---------------------------------------------
#
# Lexing costs ~0.5 us a token, ~25 us for a pgbench statement, and the digest it yields is only
# a cache key. Most queries an application sends differ from the last one only in literal
# values, so a first-level cache keyed by a *skeleton* (the text with plain numbers and plain
# single-quoted strings replaced by a placeholder) answers them after one regex substitution.
#
# Soundness: two texts with the same skeleton differ only inside replaced spans, each of which
# the lexer also reads as one literal token (the lookarounds keep digits that touch a word, a
# $n parameter, an identifier or a ".", so "4.4.4" or ".4.4" stay as written). That holds only
# where no comment, dollar quote or backslash escape can change where a literal or a statement
# ends, so texts containing "--", "/*", "\", a dollar-quote opener, or a quote left unpaired
# after the substitution get no skeleton (None) and go through the lexer.
_PG_UNSAFE = re.compile(r"--|/\*|\\|\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$")
_NUMBER = r"(?<![\w$.])(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![\w$.])"
_PG_LITERALS = re.compile(r"'[^']*(?:''[^']*)*'|" + _NUMBER)
_PG_LITERALS_DQ = re.compile(r"(\"[^\"]*(?:\"\"[^\"]*)*\")|'[^']*(?:''[^']*)*'|" + _NUMBER)


# The placeholder must not occur in any text that gets a skeleton, or "1?" and "??" would
# share one (PostgreSQL has "?" operators): NUL cannot be in a query (the protocol's strings
# are NUL-terminated), and a text holding one gets no skeleton.
_HOLE = "\0"


def _keep_identifiers(m: re.Match[str]) -> str:
    return m.group(1) or _HOLE


# MySQL: besides comments ("#" too) and backslashes, a double-quoted text (a string, or with
# ANSI_QUOTES an identifier), a backquoted identifier (`1` is a name, not a number) and
# PREPARE ... FROM 'text' (classified from its literal) keep a text from having a skeleton.
_MY_UNSAFE = re.compile(r"--|/\*|#|\\|\"|`|\0|(?i:prepare)")
_MY_LITERALS = re.compile(r"'[^']*(?:''[^']*)*'|(?<![\w$.@])(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![\w$.])")

# Longer texts get no skeleton: as cache keys they would cost more memory than lexing saves.
SKELETON_TEXT_MAX = 16384


def skeleton(sql: str, dialect: str = "postgres") -> str | None:
    """The text with plain literals replaced by a NUL, or None when that could be ambiguous
    (see above) or the text is long. Equal skeletons classify alike; the converse need not
    hold."""
    if len(sql) > SKELETON_TEXT_MAX:
        return None
    if dialect == "mysql":
        if _MY_UNSAFE.search(sql):
            return None
        key = _MY_LITERALS.sub(_HOLE, sql)
        return None if "'" in key else key
    if _HOLE in sql or _PG_UNSAFE.search(sql):
        return None
    if '"' in sql:
        key = _PG_LITERALS_DQ.sub(_keep_identifiers, sql)
        if key.count('"') % 2:
            return None
    else:
        key = _PG_LITERALS.sub(_HOLE, sql)
    if "'" in key.replace('"', ""):  # an unpaired quote: leave it to the lexer
        return None
    return key
