"""The upstream half of a client connection: forward the request at the front of the queue,
relay its response, time out, count.

:class:`HttpExchange` is the base of :class:`router.http_proxy.HttpProxyProtocol`, which adds
the client side (parsing, pipelining, refusing bad input); its mixin
:class:`router.http_tries.Tries` gets a try its connection when the fast path has none, and
handles failures and retries. Split this way, this module reads as the ordinary life of one
request after its head was parsed::

    _kick -> _start (route timeout, max_requests; a pooled connection to the endpoint, else
      Tries._try / _try_endpoint: a new one, or a wait for a slot) -> _attach (head + body so far)
    upstream_head -> upstream_body* -> upstream_flush (one write per upstream read)
      -> upstream_done -> _finish (metrics; next request, idle, or close)
    failures (Tries): upstream_failed / _try_timeout / route timeout -> _retry or _fail

Only the request at the front of the queue talks to an upstream; ``self.conn`` is its
connection (or the tunnel's, after a 101)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

from router import http_upstream as pool
from router.http_headers import (
    CHUNKED_LINE,
    CLOSE_LINE,
    CRLF,
    KEEP_ALIVE_LINE,
    LAST_CHUNK,
    STATUS_LINES,
    UPGRADE_CONNECTION_LINE,
    VIA_LINE,
    chunk,
    local_response,
    status_line,
)
from router.http_labels import NOBODY, Labels, labels_for
from router.http_request import Request
from router.http_states import (
    M_LINGER,
    M_NORMAL,
    M_TUNNEL,
    P_PIPELINE,
    P_UPSTREAM,
    P_WAIT,
    T_HEADERS,
    T_IDLE,
    T_LINGER,
    T_NONE,
    T_RESPONSE,
)
from router.http_tries import Tries

if TYPE_CHECKING:
    from router.cluster import Cluster
    from router.http_upstream import UpstreamConnection
    from router.listeners import ListenerHandle
    from router.routes import Route

LINGER_SECONDS = 2.0
NEVER = 10 * 365 * 86400.0


class HttpExchange(Tries, asyncio.Protocol):
    """State shared by both halves of a client connection, and the upstream half."""

    # Slots: a fixed layout keeps every attribute access of the hot path a slot read.
    __slots__ = (
        "buckets",
        "client_ip",
        "closed",
        "conn",
        "deadline",
        "draining",
        "early",
        "eof_in",
        "eof_out",
        "forwarded",
        "hc_head",
        "hc_host",
        "hc_method",
        "hc_parts",
        "hc_url",
        "head_end",
        "header_timeout",
        "idle_timeout",
        "kicking",
        "last_cluster",
        "last_labels",
        "last_route",
        "last_row",
        "listener",
        "loop",
        "mode",
        "name",
        "no_more",
        "no_route_labels",
        "out",
        "parsing",
        "queue",
        "read_pause",
        "spare",
        "stats",
        "timer",
        "timer_at",
        "timer_kind",
        "transport",
        "who",
        "write_paused",
    )

    def __init__(self, listener: ListenerHandle) -> None:
        self.listener = listener
        self.stats = listener.stats
        self.name = listener.name
        self.loop = asyncio.get_running_loop()
        settings = listener.config.http
        self.forwarded = settings.xff
        # What ends every relayed response head (after a Connection line, if any).
        self.head_end = VIA_LINE + CRLF if self.forwarded else CRLF
        # 0 disables a timeout: a deadline that never comes keeps the hot path branch-free.
        self.idle_timeout = settings.idle_timeout or NEVER
        self.header_timeout = settings.header_timeout or NEVER
        self.transport: asyncio.Transport | None = None
        self.client_ip = b""
        self.queue: deque[Request] = deque()  # the first is in flight; the rest wait
        self.parsing: Request | None = None  # message begun, not complete
        self.spare: Request | None = None  # a done request to renew for the next one (_finish)
        self.conn: UpstreamConnection | None = None  # serving queue[0] (or the tunnel)
        self.out: list[bytes] = []  # response bytes of the current upstream read, not yet written
        self.mode = M_NORMAL
        self.read_pause = 0
        self.write_paused = False
        self.no_more = False  # no further request is read (Connection: close, error, drain)
        self.closed = False
        self.draining = False
        self.kicking = False
        self.early: list[bytes] = []  # tunnel bytes from the client before the 101
        self.eof_in = False
        self.eof_out = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.timer_kind = T_NONE
        self.deadline = 0.0
        self.last_route: Route | None = None
        self.last_cluster: Cluster | None = None
        self.who = NOBODY  # the client's identity labels, known at connection_made
        self.last_labels = self.no_route_labels = labels_for(self.name, NOBODY, "", "")
        # The request-duration histogram's row for last_labels (None until looked up).
        self.last_row: list[float] | None = None
        self.buckets = self.stats.http_duration.buckets
        # The upstream head of the last request built on this connection, and what it was
        # built from (see _attach).
        self.hc_parts: list[bytes] | None = None
        self.hc_url = b""
        self.hc_method = b""
        self.hc_host = b""
        self.hc_head = b""

    # -- reading switches ----------------------------------------------------------------------

    def _pause(self, bit: int) -> None:
        if not self.read_pause and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_pause |= bit

    def _unpause(self, bit: int) -> None:
        if self.read_pause & bit:
            self.read_pause &= ~bit
            if not self.read_pause and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Close at once (the listener's drain deadline, or a response cut short)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _linger(self) -> None:
        """Close after an answer while the client may still be sending (a refused request, a
        body we did not read): send FIN, then read and discard for a while. Closing with
        unread input makes the kernel send a RST, which can destroy the answer before the
        client reads it (nginx's lingering_close)."""
        transport = self.transport
        if transport is None or self.closed or self.mode == M_LINGER:
            return
        if not transport.can_write_eof():
            self._close()
            return
        self.mode = M_LINGER
        transport.write_eof()
        self.read_pause = 0
        transport.resume_reading()
        self._arm(T_LINGER, self.loop.time() + LINGER_SECONDS)

    # -- the connection timer ------------------------------------------------------------------

    def _arm(self, kind: int, deadline: float) -> None:
        """Set what the connection timer measures. The timer itself is only re-created when
        the new deadline is earlier than the one it is set for; otherwise it fires early,
        sees the later deadline, and re-arms (one timer per connection, not per request)."""
        self.timer_kind = kind
        self.deadline = deadline
        if kind == T_NONE or self.closed:
            return
        if self.timer is not None:
            if self.timer_at <= deadline:
                return
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        kind = self.timer_kind
        if kind == T_NONE or self.closed:
            return
        if self.loop.time() < self.deadline:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.timer_kind = T_NONE
        if kind in (T_IDLE, T_LINGER):
            self._close()
        elif kind == T_HEADERS:
            self._header_timeout()
        elif kind == T_RESPONSE and self.queue:
            self._response_timeout(self.queue[0])

    def _header_timeout(self) -> None:
        raise NotImplementedError  # the client side refuses the request (408)

    # -- dispatch ------------------------------------------------------------------------------

    def _kick(self) -> None:
        """Start the request at the front of the queue, if it is not started yet. A loop, not
        recursion: many pipelined requests answered locally would otherwise nest deeply."""
        if self.kicking:
            return
        self.kicking = True
        try:
            while self.queue and not self.closed:
                req = self.queue[0]
                if req.started:
                    break
                self._start(req)
        finally:
            self.kicking = False

    def _start(self, req: Request) -> None:
        req.started = True
        if req.reject:
            self._local(req, req.reject, req.reject_body, close=True)
            return
        route = req.route
        cluster = req.cluster
        if route is None or cluster is None:
            self._local(req, 404, b"no route for this request\n")
            return
        if route.timeout:
            # _arm, inlined: this runs for every request. Counted from the dispatch, so a
            # pipelined request does not spend its time waiting behind the one before it.
            deadline = self.deadline = self.loop.time() + route.timeout
            self.timer_kind = T_RESPONSE
            if self.timer is None or self.timer_at > deadline:
                self._arm(T_RESPONSE, deadline)
        else:
            self.timer_kind = T_NONE
        if cluster.requests >= cluster.max_requests:
            self._overflow(req, cluster, "max_requests")
            return
        cluster.requests += 1
        req.counted = True
        if route.retries is not None:
            req.tries_left = route.retries_allowed(req.method_str)
        elif not req.expect_continue:
            # The common case, _try inlined: pick an endpoint and write to its most recently
            # parked connection (take_idle) when that one is alive.
            available = cluster.available
            if available:
                # With one endpoint available every balancer picks it: skip the call.
                endpoint = available[0] if len(available) == 1 else cluster.balancer.pick(available, req.hash_key)
                idle = endpoint.idle
                if idle:
                    conn = idle[-1]
                    transport = conn.transport
                    if not conn.closed and transport is not None and not transport.is_closing():
                        idle.pop()
                        conn.pooled = False
                        conn.reused = True
                        endpoint.active += 1
                        req.endpoint = endpoint
                        self._attach(req, conn)
                        return
                self._try_endpoint(req, endpoint)
                return
        self._try(req, None)

    def _attach(self, req: Request, conn: UpstreamConnection) -> None:
        """Write the request (head and the body so far) to a ready connection."""
        self.conn = conn
        req.conn = conn
        if self.write_paused:
            conn.pause_reading()
        # Set already when on_headers_complete found the head in the cache (see _build_head).
        head = req.head or self._build_head(req, conn)
        if req.pending:
            head = b"".join((head, *req.pending))
            req.pending = ()
            req.pending_size = 0
        # UpstreamConnection.send, inlined: this runs for every request.
        conn.owner = self
        conn.expecting = True
        conn.got_bytes = False
        conn.head_request = req.method == b"HEAD"
        if conn.status:  # UpstreamConnection.reset_response, inlined
            conn.status = 0
            conn.parts = []
            conn.has_length = False
            conn.body_left = 0
            conn.chunked = False
            conn.te_value = b""
            conn.close_delimited = False
            conn.keep_alive = True
            conn.upgrade_value = None
            conn.conn_extra = None
            conn.interim = False
            conn.rechunk = False
        transport = conn.transport
        assert transport is not None
        transport.write(head)
        if self.read_pause & P_WAIT:
            self._unpause(P_WAIT)

    def _build_head(self, req: Request, conn: UpstreamConnection) -> bytes:
        """The request's upstream head. Remembered as this connection's head cache when only
        the method, target and forwarded fields went into it (keep-alive clients repeat
        themselves: the client side reuses it for an identical request)."""
        head = req.head = req.build_head(self.client_ip, self.forwarded, conn.endpoint.key.encode())
        if req.cacheable_head():
            self.hc_parts, self.hc_url, self.hc_method, self.hc_host, self.hc_head = (
                req.parts,
                req.url,
                req.method,
                req.host,
                head,
            )
        return head

    # -- upstream callbacks --------------------------------------------------------------------

    def upstream_head(self, conn: UpstreamConnection) -> None:
        queue = self.queue
        if conn is not self.conn or not queue:
            return
        req = queue[0]
        if req.try_timer is not None:
            req.try_timer.cancel()
            req.try_timer = None
        status = conn.status
        endpoint = req.endpoint
        assert endpoint is not None
        if (status >= 500 or status == 101 or endpoint.consecutive_failures) and self._unusual_head(
            req, conn, endpoint, status
        ):
            return
        close = req.close_after or not req.keep_alive or self.draining or not req.complete or req.upgrade
        # Written into self.out directly: the body parsed from the same read joins it
        # (upstream_flush), one join and one send instead of two. On loopback each send wakes
        # the reader, which costs more than the Python around it.
        out = self.out
        out.append(STATUS_LINES.get(status) or status_line(status))
        out += conn.parts
        if not conn.has_length and not (req.method == b"HEAD" or status == 204 or status == 304):
            if req.http10:
                close = True  # no chunked for HTTP/1.0: the body ends when we close
            else:
                req.resp_chunked = conn.rechunk = True
                if conn.chunked:  # keep other codings it names (gzip, chunked)
                    out += (b"Transfer-Encoding: ", conn.te_value, CRLF)
                else:
                    out.append(CHUNKED_LINE)
        if close:
            out.append(CLOSE_LINE)
        elif req.http10:
            out.append(KEEP_ALIVE_LINE)
        out.append(self.head_end)
        req.close_after = close
        req.status = status
        req.sent = True

    def upstream_body(self, conn: UpstreamConnection, data: bytes) -> None:
        if conn is self.conn:
            self.out.append(chunk(data) if self.queue[0].resp_chunked else data)

    def upstream_flush(self, conn: UpstreamConnection) -> None:
        """The end of one upstream read: write what it produced."""
        if self.out:
            self._flush()

    def _flush(self) -> None:
        out = self.out
        if self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.out = []

    def upstream_done(self, conn: UpstreamConnection) -> None:
        queue = self.queue
        if conn is not self.conn or not queue:
            return
        req = queue[0]
        out = self.out
        if req.resp_chunked:
            out.append(LAST_CHUNK)
        if out:  # _flush, inlined
            transport = self.transport
            if transport is not None and not self.closed:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.out = []
        self.conn = None
        if self.read_pause & P_UPSTREAM:
            self._unpause(P_UPSTREAM)
        now = self.loop.time()
        pool.release(conn, conn.keep_alive and req.complete, now)
        self._finish(req, now=now)

    def upstream_tunnel_data(self, conn: UpstreamConnection, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def upstream_tunnel_eof(self, conn: UpstreamConnection) -> None:
        self.eof_out = True
        if self.transport is not None and self.transport.can_write_eof() and not self.eof_in:
            self.transport.write_eof()
        else:
            self._close()

    def upstream_pause(self, conn: UpstreamConnection) -> None:
        if conn is self.conn:
            self._pause(P_UPSTREAM)

    def upstream_resume(self, conn: UpstreamConnection) -> None:
        if conn is self.conn:
            self._unpause(P_UPSTREAM)

    # -- finishing -----------------------------------------------------------------------------

    def _local(self, req: Request, status: int, body: bytes, close: bool = False) -> None:
        """Answer ``req`` with a response of the proxy's own."""
        self._drop_upstream(req)
        close = close or req.close_after or not req.keep_alive or self.draining or not req.complete or req.upgrade
        if self.transport is not None and not self.closed:
            head_only = req.method == b"HEAD"
            self.transport.write(
                local_response(status, body, close=close, head_only=head_only, http10_keep_alive=req.http10)
            )
        req.close_after = close
        req.status = status
        self._finish(req)

    def _labels_of(self, req: Request) -> Labels:
        route, cluster = req.route, req.cluster
        if route is None or cluster is None:
            return self.no_route_labels
        if route is self.last_route and cluster is self.last_cluster:
            return self.last_labels
        labels = labels_for(self.name, self.who, route.name, cluster.name)
        self.last_route, self.last_cluster, self.last_labels = route, cluster, labels
        self.last_row = None
        return labels

    def _finish(self, req: Request, abort: bool = False, now: float = 0.0) -> None:
        """The response of the request at the front of the queue is written (or failed).
        ``now``: the loop's time, when the caller has it at hand."""
        req.done = True
        if req.pending:
            req.pending = ()
        endpoint = req.endpoint
        if req.try_timer is not None or req.waiting:
            self._release(req)
        elif endpoint is not None:
            # _release, inlined for the usual case (no try timer, not waiting; a request whose
            # response came is not connecting either).
            endpoint.active -= 1
            req.endpoint = None
        req.conn = None
        if req.counted:
            req.counted = False
            cluster = req.cluster
            assert cluster is not None
            cluster.requests -= 1
        if not now:
            now = self.loop.time()
        status = req.status
        if status:
            stats = self.stats
            if req.route is self.last_route and req.cluster is self.last_cluster:
                labels = self.last_labels
                row = self.last_row
            else:
                labels = self._labels_of(req)
                row = None
            stats.http_requests.values[labels.by_class[status // 100]] += 1  # .inc(), inlined
            elapsed = perf_counter() - req.start
            if row is not None:  # http_duration.observe(), inlined
                row[bisect_left(self.buckets, elapsed)] += 1
                row[-1] += elapsed
            else:
                duration = stats.http_duration
                duration.observe(labels.duration, elapsed)
                if labels is self.last_labels:
                    self.last_row = duration.series.get(labels.duration)
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        if self.out:
            self._flush()
        if abort:
            self.abort()
            return
        if req.close_after or self.draining or (self.no_more and not queue and self.parsing is None):
            if self.parsing is not None or not req.complete or self.read_pause:
                self._linger()
            else:
                self._close()
            return
        if queue:
            if len(queue) < 2 and self.read_pause & P_PIPELINE:
                self._unpause(P_PIPELINE)
            self._kick()
        elif self.parsing is not None:
            self._unpause(P_PIPELINE)
            # parsing.start is a perf_counter() reading; the timers run on the loop's clock
            self._arm(T_HEADERS, self.loop.time() + self.header_timeout - (perf_counter() - self.parsing.start))
        else:
            if self.read_pause & P_PIPELINE:
                self._unpause(P_PIPELINE)
            if not req.odd and req.complete and not req.reject:
                # Nothing refers to it any more, and only Request.renew's fields changed.
                self.spare = req
            deadline = self.deadline = now + self.idle_timeout  # _arm(T_IDLE), inlined
            self.timer_kind = T_IDLE
            if self.timer is None or self.timer_at > deadline:
                self._arm(T_IDLE, deadline)

    # -- tunnels (Upgrade) ---------------------------------------------------------------------

    def _start_tunnel(self, req: Request, conn: UpstreamConnection) -> None:
        assert self.transport is not None and conn.upgrade_value is not None
        out = [status_line(101), *conn.parts, b"Upgrade: ", conn.upgrade_value, CRLF, UPGRADE_CONNECTION_LINE]
        if self.forwarded:
            out.append(VIA_LINE)
        out.append(CRLF)
        self.transport.write(b"".join(out))
        conn.tunnel = True
        self.mode = M_TUNNEL
        self._arm(T_NONE, 0.0)
        req.sent = True
        labels = self._labels_of(req)
        self.stats.http_requests.inc(labels.by_class[1])
        self.stats.http_duration.observe(labels.duration, perf_counter() - req.start)
        # The request stays at the front of the queue, holding its endpoint and cluster
        # slots, until the tunnel ends (connection_lost releases them).
        if req.try_timer is not None:
            req.try_timer.cancel()
            req.try_timer = None
        early, self.early = self.early, []
        for data in early:
            conn.write(data)
        self._unpause(P_WAIT)
