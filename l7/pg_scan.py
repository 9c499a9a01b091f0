"""The PostgreSQL filter's fast paths, the reading half: runs of the common messages read
straight from a received chunk, each checked exactly as the decoder (`pg_decoder.py`) would,
without building message objects. Pure functions: they change nothing; `pg_filter.PgSession`
applies what they found, and anything they stop at goes through the decoder.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from l7.model import Statement
    from l7.policy import PolicyEngine

HEADER = struct.Struct("!BI")  # type byte (as an int), length
STATUS = {73: "I", 84: "T", 69: "E"}  # ReadyForQuery status bytes
MAX_FAST = 1 << 20  # longer messages go through the decoder (and its size cap)
_KINDS = b"SP"  # Describe / Close: statement or portal
OP_DESCRIBE, OP_SYNC, OP_FLUSH = (68, "", ""), (83, "", ""), (72, "", "")


def scan_client(
    data: bytes,
    engine: PolicyEngine | None,
    portals: dict[str, str],
    parsed: dict[str, list[Statement]],
    allowed: dict[str, PolicyEngine],
) -> tuple[int, list[tuple[int, str, str]]]:
    """The common extended-protocol run (Bind, Describe, Execute of a statement already
    allowed, Sync, Flush) read straight from the chunk, without message objects, each
    message checked as the decoder would. Nothing is changed yet: returns where the run
    stops (the end, or a message the general path takes) and what `PgSession._apply_client`
    does for it, as `PgSession._client_event` would (every one of them is forwarded)."""
    pos, end = 0, len(data)
    unpack, find = HEADER.unpack_from, data.find
    ops: list[tuple[int, str, str]] = []
    bound: dict[str, str] = {}  # portals bound earlier in this chunk
    while end - pos >= 5:
        kind, length = unpack(data, pos)
        stop = pos + 1 + length
        if length < 4 or stop > end:
            break
        if kind == 66:  # Bind: portal cstring | statement cstring | ... (not read)
            i = find(b"\0", pos + 5, stop)
            j = find(b"\0", i + 1, stop) if i >= 0 else -1
            if j < 0:
                break
            portal = data[pos + 5 : i].decode("utf-8", "replace")
            bound[portal] = stmt = data[i + 1 : j].decode("utf-8", "replace")
            ops.append((66, portal, stmt))
        elif kind == 69:  # Execute: portal cstring | max rows int32
            i = find(b"\0", pos + 5, stop)
            if i < 0 or stop != i + 5:
                break
            portal = data[pos + 5 : i].decode("utf-8", "replace")
            name = bound[portal] if portal in bound else portals.get(portal, "")
            if name not in parsed or (engine is not None and allowed.get(name) is not engine):
                break
            ops.append((69, name, ""))
        elif kind == 68:  # Describe: kind byte S or P | name cstring
            if length < 6 or data[pos + 5] not in _KINDS or find(b"\0", pos + 6, stop) != stop - 1:
                break
            ops.append(OP_DESCRIBE)
        elif kind == 83 or kind == 72:  # Sync, Flush: empty
            if length != 4:
                break
            ops.append(OP_SYNC if kind == 83 else OP_FLUSH)
        else:
            break
        pos = stop
    return pos, ops


def scan_server(data: bytes) -> int:
    """Where the run of common answers (ParseComplete, BindComplete, RowDescription,
    DataRow, CommandComplete, ReadyForQuery, NoData, CloseComplete) at the start of the
    chunk ends, each checked as the decoder would. Only while nothing is being cut: each
    goes to the client as it is, `PgSession._apply_server` accounts for them."""
    pos, end = 0, len(data)
    unpack, find = HEADER.unpack_from, data.find
    while end - pos >= 5:
        kind, length = unpack(data, pos)
        stop = pos + 1 + length
        if length < 4 or stop > end:
            break
        if kind == 68 or kind == 84:  # DataRow, RowDescription: passed through
            pass
        elif kind == 67:  # CommandComplete: tag cstring
            if length > MAX_FAST or find(b"\0", pos + 5, stop) != stop - 1:
                break
        elif kind == 90:  # ReadyForQuery: status byte I, T or E
            if length != 5 or data[pos + 5] not in STATUS:
                break
        elif kind == 50 or kind == 49 or kind == 110 or kind == 51:
            if length != 4:  # BindComplete, ParseComplete, NoData, CloseComplete: empty
                break
        else:
            break
        pos = stop
    return pos
