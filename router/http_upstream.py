"""Upstream HTTP/1.1 connections and their keep-alive pools.

An :class:`UpstreamConnection` is an ``asyncio.Protocol`` with an httptools response parser.
It serves one request at a time for whoever holds it (its ``owner``, a downstream
connection, which writes the request to ``transport`` itself: see ``HttpExchange._attach``);
it reports the response through the :class:`UpstreamOwner` callbacks and never writes to the
client itself. Between requests it waits in ``Endpoint.idle`` (a deque: the most
recently used connection is on the right and is taken first, so surplus connections age out
at the left).

Pool bookkeeping lives here so the request path stays a few attribute updates:

* ``endpoint.connections`` / ``cluster.connections`` count a connection from the moment its
  connect starts (a connecting socket holds a slot of ``max_connections``) until it is lost;
* a request that needs a new connection while the cluster is at ``max_connections`` waits in
  a per-cluster queue (it counts in ``cluster.pending``) and is handed the next connection that
  is released, or a free slot when one closes;
* idle connections close after ``cluster.config.idle_timeout``. The timer is lazy: it is
  created when a connection is parked and re-armed from the time it was last parked, so a busy
  connection does not create and cancel a timer per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Protocol

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser

from router.http_headers import (
    CONNECTION_CACHE,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_HOP,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    KIND_CACHE,
    SEP,
    chunk,
    drop_named,
    header_kind,
    is_chunked,
    parse_connection,
)

if TYPE_CHECKING:
    from router.cluster import Cluster, Endpoint
    from router.metrics import RouterStats

CRLF = b"\r\n"
_kind_of = KIND_CACHE.get  # one global load and a call per header, no method lookup


class UpstreamOwner(Protocol):
    """What a downstream connection offers its upstream connection."""

    out: list[bytes]  # response bytes waiting for upstream_flush

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        """A connection opened for (or handed to) this owner is ready for the request."""

    def upstream_slot(self) -> None:
        """A waiting owner may now open a connection: a slot under max_connections opened."""

    def upstream_head(self, conn: UpstreamConnection) -> None:
        """The response head (status, headers) is parsed; see the conn's response fields."""

    def upstream_body(self, conn: UpstreamConnection, data: bytes) -> None: ...

    def upstream_flush(self, conn: UpstreamConnection) -> None:
        """The end of one read from the upstream: write out what head/body callbacks gave."""

    def upstream_done(self, conn: UpstreamConnection) -> None:
        """The response is complete."""

    def upstream_failed(self, conn: UpstreamConnection, kind: str) -> None:
        """``connect`` (connect error/timeout), ``reset`` (lost before the response ended) or
        ``protocol`` (unparseable response). The connection is already closed."""

    def upstream_tunnel_data(self, conn: UpstreamConnection, data: bytes) -> None: ...

    def upstream_tunnel_eof(self, conn: UpstreamConnection) -> None: ...

    def upstream_pause(self, conn: UpstreamConnection) -> None:
        """The upstream socket's write buffer is full: stop reading the client."""

    def upstream_resume(self, conn: UpstreamConnection) -> None: ...


class _SkipBody(Exception):
    """Raised from on_headers_complete to stop the parser after the head of a response to
    HEAD: httptools cannot be told the request was HEAD, and would wait for Content-Length
    bytes that never come."""


# Connect tasks in flight. The loop keeps only weak references to tasks, so they are held
# here until their done callback runs.
_connecting: set[asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]] = set()
# Owners waiting for a connection slot, per cluster. An entry exists only while someone
# waits, so the release path's check is a test of an (almost always) empty dict.
_waiters: dict[Cluster, deque[UpstreamOwner]] = {}


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_counted",
        "_paused_reading",
        "_timer",
        "body_left",
        "chunked",
        "close_delimited",
        "closed",
        "cluster",
        "conn_extra",
        "endpoint",
        "expecting",
        "got_bytes",
        "has_length",
        "head_request",
        "idle_since",
        "interim",
        "keep_alive",
        "loop",
        "owner",
        "parser",
        "parts",
        "pooled",
        "rechunk",
        "reused",
        "stats",
        "status",
        "te_value",
        "transport",
        "tunnel",
        "upgrade_value",
    )

    def __init__(self, endpoint: Endpoint, stats: RouterStats, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.cluster: Cluster = endpoint.cluster
        self.stats = stats
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.parser = HttpResponseParser(self)
        self._counted = True  # holds a slot in endpoint/cluster.connections until _forget()
        self._paused_reading = False
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.pooled = False
        self.reused = False  # served a request before: a reset may be the keep-alive race
        self.tunnel = False
        self.idle_since = 0.0
        self.expecting = False  # a request was written and its response has not ended
        self.head_request = False
        self.got_bytes = False
        self.reset_response()

    def reset_response(self) -> None:
        # Reset here rather than in on_message_begin: one parser callback less per response.
        # HttpExchange._attach has a copy of this inlined: keep the two in step.
        self.status = 0
        self.parts: list[bytes] = []
        self.has_length = False
        self.body_left = 0  # Content-Length bytes still to come (0 when not known that way)
        self.chunked = False
        self.te_value = b""
        self.close_delimited = False
        self.keep_alive = True
        self.upgrade_value: bytes | None = None
        self.conn_extra: frozenset[bytes] | None = None
        self.interim = False
        self.rechunk = False  # the owner re-frames the body as chunks (see upstream_head)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.owner is not None:
                self.owner.upstream_tunnel_data(self, data)
            return
        if not self.expecting:
            # Bytes nobody asked for (a server talking on an idle connection, or the rest of
            # a response we gave up on): the stream is out of step, so it cannot be reused.
            self.abort()
            return
        self.got_bytes = True
        if self.body_left and self.status:
            self._pass_body(data)
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # A 101 response: what follows its head belongs to the tunnel.
            if self.tunnel and self.owner is not None:
                rest = data[exc.args[0] :]
                if rest:
                    self.owner.upstream_tunnel_data(self, rest)
            elif not self.closed:
                self._fail("protocol")
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _SkipBody):
                # The head of a HEAD response ended; llhttp stops there. Anything after it in
                # this read would be a body the server should not have sent.
                self.parser = HttpResponseParser(self)
                if not data.endswith(b"\r\n\r\n"):
                    self.keep_alive = False
                if self.expecting and not self.closed:
                    self._complete()
            elif not self.closed:
                raise
        except HttpParserError:
            if not self.closed:
                self._fail("protocol")
        else:
            owner = self.owner
            if owner is not None and owner.out:
                owner.upstream_flush(self)

    def _pass_body(self, data: bytes) -> None:
        """The middle of a Content-Length body: hand the read over as it is. Going through
        the parser would cost a copy of every read (httptools slices the body out); the
        parser, left behind mid-body, is replaced when the body ends."""
        owner = self.owner
        left = self.body_left
        if len(data) < left:
            self.body_left = left - len(data)
            if owner is not None:
                owner.upstream_body(self, data)
                owner.upstream_flush(self)
            return
        self.body_left = 0
        self.parser = HttpResponseParser(self)
        if len(data) > left:
            # Bytes after the end of the response: the server is out of step.
            self.keep_alive = False
            data = data[:left]
        if owner is not None:
            owner.upstream_body(self, data)
        self.expecting = False
        if owner is not None and self.owner is owner:
            owner.upstream_done(self)

    def eof_received(self) -> bool | None:
        if self.tunnel and self.owner is not None:
            self.owner.upstream_tunnel_eof(self)
            return True  # half-close: the client may still send
        return None  # close; connection_lost finishes a close-delimited body

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pooled:
            self.pooled = False
            try:
                self.endpoint.idle.remove(self)
            except ValueError:
                pass
        owner = self.owner
        if owner is not None and self.expecting and self.close_delimited and not self.tunnel and exc is None:
            # No length and not chunked: the body ends when the server closes (a reset is
            # a failure, though).
            self._complete()
            owner = None
        self.owner = None
        self._forget()
        if owner is not None:
            owner.upstream_failed(self, "reset")

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_pause(self)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_resume(self)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # A trailer field (after a chunked body) lands here too, after upstream_head has
        # copied the fields: it is not forwarded, and what it sets is not read any more (a
        # "Connection: close" one still stops the connection's reuse).
        kind = _kind_of(name)
        if kind is None:
            kind = header_kind(name)
        if not kind:
            self.parts += (name, SEP, value, CRLF)
        elif kind == H_CONTENT_LENGTH:
            self.has_length = True
            self.body_left = int(value)  # llhttp has checked it is a number
            self.parts.extend((name, SEP, value, CRLF))
        elif kind == H_TRANSFER_ENCODING:
            self.te_value = value
            self.chunked = is_chunked(value)
        elif kind == H_CONNECTION:
            close, extra = CONNECTION_CACHE.get(value) or parse_connection(value)
            if close:
                self.keep_alive = False
            if extra:  # the names may come before or after Connection: filter at the end
                self.conn_extra = extra if self.conn_extra is None else self.conn_extra | extra
        elif kind == H_UPGRADE:
            self.upgrade_value = value
        elif kind != H_HOP:
            # Via (ours is added on its own line) and request-only names are forwarded; the
            # hop-by-hop ones (keep-alive, proxy-connection, te, trailer) are dropped.
            self.parts.extend((name, SEP, value, CRLF))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = self.status = parser.get_status_code()
        if status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): llhttp treats it as a whole
            # message and parses the final response next. Interim responses are not relayed.
            self.interim = True
            return
        if self.conn_extra:
            self.parts = drop_named(self.parts, self.conn_extra)
        if self.keep_alive and not parser.should_keep_alive():
            self.keep_alive = False
        head_request = self.head_request
        if not self.has_length or head_request or status == 204 or status == 304 or status == 101:
            # Anything but the usual body of known length, which needs nothing more here:
            # close_delimited is False (reset) and body_left the length (on_header).
            no_body = head_request or status == 204 or status == 304
            if no_body or self.chunked or status == 101:
                self.body_left = 0
            elif not self.has_length:
                self.close_delimited = True
                self.keep_alive = False
        owner = self.owner
        if owner is not None:
            owner.upstream_head(self)
        if head_request and not self.closed:
            raise _SkipBody

    def on_body(self, body: bytes) -> None:
        if self.body_left:
            self.body_left -= len(body)
        owner = self.owner
        if owner is not None:
            # upstream_body, inlined: while it holds this connection the owner attends to it.
            owner.out.append(chunk(body) if self.rechunk else body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.reset_response()
            return
        if self.tunnel or self.closed:
            return
        self.expecting = False  # _complete(), inlined
        owner = self.owner
        if owner is not None:
            owner.upstream_done(self)

    # -- helpers -------------------------------------------------------------------------

    def _complete(self) -> None:
        self.expecting = False
        owner = self.owner
        if owner is not None:
            owner.upstream_done(self)

    def _fail(self, kind: str) -> None:
        owner = self.owner
        self.owner = None
        self.abort()
        if owner is not None:
            owner.upstream_failed(self, kind)

    def _forget(self) -> None:
        """Give back the connection slot (once, whichever of connect failure or
        connection_lost comes first), and let a waiting request use it."""
        if not self._counted:
            return
        self._counted = False
        self.endpoint.connections -= 1
        cluster = self.cluster
        cluster.connections -= 1
        if cluster in _waiters:
            _wake_one(cluster, None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after flushing what was written (a tunnel's last bytes)."""
        self.owner = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now: it is mid-response, so it cannot be reused anyway."""
        self.owner = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def _idle_check(self) -> None:
        self._timer = None
        if self.closed or not self.pooled:
            return  # busy again: release() arms a new timer when it is parked next
        timeout = self.cluster.idle_timeout
        remaining = self.idle_since + timeout - self.loop.time()
        if remaining > 0:
            self._timer = self.loop.call_later(remaining, self._idle_check)
            return
        self.close()  # connection_lost takes it out of the deque


# -- the pool -------------------------------------------------------------------------------


def take_idle(endpoint: Endpoint) -> UpstreamConnection | None:
    """The most recently parked live connection to ``endpoint``, or None."""
    idle = endpoint.idle
    while idle:
        conn: UpstreamConnection = idle.pop()
        conn.pooled = False
        transport = conn.transport
        # A server's close may be seen (transport closing) before connection_lost has run.
        if not conn.closed and transport is not None and not transport.is_closing():
            conn.reused = True
            return conn
    return None


def release(conn: UpstreamConnection, reusable: bool, now: float = 0.0) -> None:
    """The owner is done with ``conn``: park it, hand it to a waiting request, or close it.
    ``now``: the loop's time, when the caller has it at hand."""
    conn.owner = None
    if conn._paused_reading:
        conn.resume_reading()  # a parked connection must read, or a server's close goes unseen
    if conn.closed:
        return
    cluster = conn.cluster
    # (idle_timeout 0: idle connections are not kept at all; an endpoint that left the
    # cluster, a registry change, keeps none either)
    if not reusable or conn.expecting or cluster.stopped or conn.endpoint.removed or not cluster.idle_timeout:
        conn.close()
        return
    if cluster in _waiters:
        _wake_one(cluster, conn)
        return
    conn.idle_since = now or conn.loop.time()
    conn.pooled = True
    conn.endpoint.idle.append(conn)
    if conn._timer is None:
        conn._timer = conn.loop.call_later(cluster.idle_timeout, conn._idle_check)


def steal_idle(cluster: Cluster) -> bool:
    """At max_connections, close one idle connection of the cluster (to another endpoint)
    so its slot can be used for the endpoint the balancer chose. True if one was closed."""
    for endpoint in cluster.endpoints:
        while endpoint.idle:
            conn: UpstreamConnection = endpoint.idle.popleft()  # the oldest
            conn.pooled = False
            if not conn.closed:
                conn.close()
                conn._forget()  # the slot is free now, not when connection_lost runs
                return True
    return False


def connect(endpoint: Endpoint, owner: UpstreamOwner, stats: RouterStats) -> UpstreamConnection:
    """Open a new connection for ``owner``; it gets ``upstream_ready`` or ``upstream_failed``."""
    loop = asyncio.get_running_loop()
    cluster = endpoint.cluster
    endpoint.connections += 1
    cluster.connections += 1
    conn = UpstreamConnection(endpoint, stats, loop)
    conn.owner = owner
    task = loop.create_task(loop.create_connection(lambda: conn, endpoint.host, endpoint.port))
    timeout = cluster.config.connect_timeout
    timer = loop.call_later(timeout, task.cancel) if timeout else None
    _connecting.add(task)
    task.add_done_callback(partial(_connected, conn, timer))
    return conn


def _connected(
    conn: UpstreamConnection,
    timer: asyncio.TimerHandle | None,
    task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]],
) -> None:
    _connecting.discard(task)
    if timer is not None:
        timer.cancel()
    failed = task.cancelled() or task.exception() is not None
    cluster = conn.cluster
    if failed:
        conn.stats.upstream_connect_failures.inc((cluster.name,))
        owner = conn.owner
        conn.owner = None
        conn.closed = True
        if conn.transport is not None:
            conn.transport.abort()
        conn._forget()
        if owner is not None:
            owner.upstream_failed(conn, "connect")
        return
    conn.stats.upstream_connections.inc((cluster.name,))
    if conn.closed:
        # Given up while connecting (its request was answered or its client left).
        if conn.transport is not None:
            conn.transport.abort()
        return
    owner = conn.owner
    if owner is None:
        release(conn, True)  # the request went away while connecting: keep the connection
    else:
        owner.upstream_ready(conn)


# -- waiting for a connection slot ------------------------------------------------------------


def has_waiters(cluster: Cluster) -> bool:
    return cluster in _waiters


def wait_for_slot(cluster: Cluster, owner: UpstreamOwner) -> None:
    cluster.pending += 1
    queue = _waiters.get(cluster)
    if queue is None:
        queue = _waiters[cluster] = deque()
    queue.append(owner)


def stop_waiting(cluster: Cluster, owner: UpstreamOwner) -> None:
    queue = _waiters.get(cluster)
    if queue is None:
        return
    try:
        queue.remove(owner)
    except ValueError:
        return
    cluster.pending -= 1
    if not queue:
        del _waiters[cluster]


def _wake_one(cluster: Cluster, conn: UpstreamConnection | None) -> None:
    """Hand ``conn`` (or, with None, a free slot) to the longest waiting request."""
    queue = _waiters[cluster]
    owner = queue.popleft()
    if not queue:
        del _waiters[cluster]
    cluster.pending -= 1
    loop = asyncio.get_running_loop()
    # Deferred: this runs inside another connection's callbacks.
    if conn is not None:
        conn.owner = owner  # reserved, so nothing else takes it meanwhile
        loop.call_soon(owner.upstream_ready, conn)
    else:
        loop.call_soon(owner.upstream_slot)
