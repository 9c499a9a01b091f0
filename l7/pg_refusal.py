"""How a refused statement is made the server's own error (see l7/pg_filter.py).

The proxy never answers for the server: it sends a statement that makes the server raise the
refusal, so the transaction state on both sides stays the same as after any server error.
"""

from __future__ import annotations

from l7.pg_decoder import build_message


def raise_statement(sqlstate: str, message: str) -> tuple[str, str]:
    """SQL that makes the server raise ``message`` with ``sqlstate``, and the message as the
    server will report it. The message is reduced to characters that cannot end the literal
    or the dollar quote."""
    text = "".join(c for c in message if c.isprintable() and c not in "\\$")
    state = "".join(c for c in sqlstate if c.isalnum())[:5]
    quoted = text.replace("'", "''")
    sql = f"DO $pointsman$BEGIN RAISE EXCEPTION USING ERRCODE = '{state}', MESSAGE = '{quoted}'; END$pointsman$"
    return sql, text


def simple_substitute(sql: str) -> bytes:
    # a Query message: the whole simple-protocol string is replaced
    return build_message(b"Q", sql.encode() + b"\0")


def extended_substitute(sql: str) -> bytes:
    # Parse (unnamed, no parameter types), Bind (unnamed portal/statement, no params, no
    # result formats), Execute (unnamed portal, all rows).
    return (
        build_message(b"P", b"\0" + sql.encode() + b"\0" + b"\0\0")
        + build_message(b"B", b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0")
        + build_message(b"E", b"\0" + b"\0\0\0\0")
    )
