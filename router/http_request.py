"""Per-request state of the HTTP proxy, and the upstream request head built from it.

A :class:`Request` is created when httptools reports the start of a message and lives until
its response has been written (or the connection is gone). It carries what the downstream
parser saw (method, target, headers already split into "forward as is" and "the proxy looks
at this"), the body bytes not yet written upstream, a copy of the body kept for retries while
it is small, and the routing decision taken when the head was complete.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from router.http_headers import (
    CHUNKED_LINE,
    CRLF,
    UPGRADE_CONNECTION_LINE,
    VIA_VALUE,
    XF_PROTO_LINE,
    cookie_value,
    drop_named,
)

if TYPE_CHECKING:
    from router.cluster import Cluster, Endpoint
    from router.http_upstream import UpstreamConnection
    from router.routes import Route

# A body is kept for a possible retry while it is at most this big; a bigger one is streamed
# without a copy and its request is not retried.
REPLAY_LIMIT = 64 * 1024
METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")}


class Request:
    __slots__ = (
        "body_started",
        "chunked",
        "close_after",
        "cluster",
        "complete",
        "conn",
        "conn_extra",
        "connecting",
        "continued",
        "counted",
        "done",
        "endpoint",
        "expect_continue",
        "hash_key",
        "head",
        "host",
        "http10",
        "keep_alive",
        "method",
        "odd",
        "parts",
        "pending",
        "pending_size",
        "reject",
        "reject_body",
        "resp_chunked",
        "retried_reuse",
        "route",
        "sent",
        "start",
        "started",
        "status",
        "tries_left",
        "try_timer",
        "upgrade",
        "upgrade_value",
        "url",
        "via",
        "waiting",
        "wire",
        "wire_size",
        "xff",
        "xfh",
    )

    def __init__(self, start: float, url: bytes) -> None:
        # time.perf_counter() at the request's first byte: durations need sub-millisecond
        # precision, and uvloop's loop.time() ticks in milliseconds
        self.start = start
        self.url = url
        self.method = b""
        self.http10 = False
        self.keep_alive = True
        self.parts: list[bytes] = []  # headers forwarded as they came: name, ": ", value, CRLF
        self.host = b""
        # A field the proxy acts on other than Host came (Content-Length, Connection, Upgrade,
        # X-Forwarded-For...), so the fields from conn_extra to via may have been set: such a
        # request is not renewed (see renew) and its head is cached only when cacheable_head.
        self.odd = False
        self.conn_extra: frozenset[bytes] | None = None  # extra names listed in Connection
        self.upgrade = False
        self.upgrade_value: bytes | None = None
        self.expect_continue = False
        self.chunked = False
        self.xff: bytes | None = None
        self.xfh = False
        self.via: bytes | None = None
        self.complete = False  # the whole request message was received
        self.body_started = False
        # Body bytes, framed for the upstream, not yet written (no connection yet). The empty
        # tuple until there are some: most requests have no body, and a list is an allocation.
        self.pending: list[bytes] | tuple[()] = ()
        self.pending_size = 0
        # Every framed body byte so far, while the body is small enough to replay (None once
        # it is not); the empty tuple while there is none.
        self.wire: list[bytes] | tuple[()] | None = ()
        self.wire_size = 0
        self.reject = 0  # a status the proxy answers with instead of forwarding
        self.reject_body = b""
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.endpoint: Endpoint | None = None  # holds endpoint.active while set
        self.conn: UpstreamConnection | None = None  # the request is written to it
        self.connecting = False
        self.waiting = False  # queued for a connection slot (counts in cluster.pending)
        self.hash_key: bytes | None = None
        self.head = b""
        self.started = False
        self.counted = False  # holds a cluster.requests slot
        self.done = False
        self.continued = False
        self.sent = False  # some response byte went to the client: no retry from here on
        self.resp_chunked = False
        self.close_after = False
        self.retried_reuse = False
        self.tries_left = 0
        self.try_timer: asyncio.TimerHandle | None = None
        self.status = 0

    def renew(self, start: float, url: bytes) -> None:
        """Make a done request into a new one, for its connection's next request. Only for
        a request that took the plain path (not odd, complete, not refused; see
        HttpExchange._finish): this resets what such a request changes on its way, and the
        rest is still at its __init__ value."""
        self.start = start
        self.url = url
        self.method = b""
        self.http10 = False
        self.keep_alive = True
        self.parts = []
        self.host = b""
        self.complete = False
        self.route = None
        self.cluster = None
        self.hash_key = None
        self.head = b""
        self.started = False
        self.done = False
        self.sent = False
        self.resp_chunked = False
        self.close_after = False
        self.retried_reuse = False
        self.tries_left = 0
        self.pending = ()
        self.status = 0

    @property
    def method_str(self) -> str:
        """The method as text (for route matching and retry rules; not needed per request)."""
        method = self.method
        return METHOD_NAMES.get(method) or method.decode("ascii", "replace")

    def add_body(self, wire: bytes) -> None:
        """Body bytes (already framed) that arrived from the client."""
        kept = self.wire
        if kept is not None:
            self.wire_size += len(wire)
            if self.wire_size > REPLAY_LIMIT:
                self.wire = None
            elif kept:
                kept.append(wire)
            else:
                self.wire = [wire]
        conn = self.conn
        if conn is not None:
            conn.write(wire)
        elif not self.done:
            pending = self.pending
            if pending:
                pending.append(wire)
            else:
                self.pending = [wire]
            self.pending_size += len(wire)

    def cacheable_head(self) -> bool:
        """Whether build_head depends on nothing but the method, the target, the forwarded
        fields and the connection (which a per-connection head cache can key on)."""
        return (
            bool(self.host)
            and not self.conn_extra
            and not self.chunked
            and not self.upgrade
            and self.xff is None
            and self.via is None
        )

    def build_head(self, client_ip: bytes, forwarded: bool, authority: bytes) -> bytes:
        """The request head for the upstream: always HTTP/1.1 and keep-alive. ``authority``
        (the endpoint's host:port) is the Host of an HTTP/1.0 request that had none, since
        HTTP/1.1 requires one."""
        parts = self.parts
        if self.conn_extra:
            parts = drop_named(parts, self.conn_extra)
        out = [self.method, b" ", self.url, b" HTTP/1.1\r\n", *parts]
        if not self.host:
            out += (b"Host: ", authority, CRLF)
        if self.chunked:
            out.append(CHUNKED_LINE)
        if self.upgrade and self.upgrade_value is not None:
            out += (b"Upgrade: ", self.upgrade_value, CRLF, UPGRADE_CONNECTION_LINE)
        if forwarded:
            xff = self.xff
            out += (b"X-Forwarded-For: ", xff + b", " + client_ip if xff else client_ip, CRLF, XF_PROTO_LINE)
            if not self.xfh and self.host:
                out += (b"X-Forwarded-Host: ", self.host, CRLF)
            via = self.via
            out += (b"Via: ", via + b", " + VIA_VALUE if via else VIA_VALUE, CRLF)
        out.append(CRLF)
        return b"".join(out)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a forwarded header (``name`` lower case); a slow scan, used for
        hashing only."""
        parts = self.parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == name:
                return parts[i + 2]
        return None

    def cookie(self, name: bytes) -> bytes | None:
        parts = self.parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == b"cookie":
                value = cookie_value(parts[i + 2], name)
                if value is not None:
                    return value
        return None

    def header_dict(self) -> dict[str, str]:
        """Lower-case header names to values, for route tables that match on headers."""
        parts = self.parts
        out: dict[str, str] = {}
        for i in range(0, len(parts), 4):
            out.setdefault(parts[i].decode("latin-1").lower(), parts[i + 2].decode("latin-1"))
        if self.host:
            out.setdefault("host", self.host.decode("latin-1"))
        return out
