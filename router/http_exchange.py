"""The upstream half of a client connection: forward the request at the front of the queue,
relay its response, retry, time out, count.

:class:`HttpExchange` is the base of :class:`router.http_proxy.HttpProxyProtocol`, which adds
the client side (parsing, pipelining, refusing bad input). Split this way, this module reads
as the life of one request after its head was parsed::

    _kick -> _start (route timeout, max_requests) -> _try (pick an endpoint; a pooled
      connection, a new one, or a wait for a slot) -> _attach (head + body so far)
    upstream_head -> upstream_body* -> upstream_flush (one write per upstream read)
      -> upstream_done -> _finish (metrics; next request, idle, or close)
    failures: upstream_failed / _try_timeout / route timeout -> _retry or _fail

Only the request at the front of the queue talks to an upstream; ``self.conn`` is its
connection (or the tunnel's, after a 101).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING

from router import http_upstream as pool
from router.http_headers import (
    CHUNKED_LINE,
    CLOSE_LINE,
    CONTINUE_100,
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
from router.http_request import Request
from router.routes import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from router.cluster import Cluster, Endpoint
    from router.http_upstream import UpstreamConnection
    from router.listeners import ListenerHandle
    from router.routes import Route

# Why reading from the client is paused (a bit each; reading resumes when none is left).
P_PIPELINE = 1  # a request is queued behind the one in flight
P_UPSTREAM = 2  # the upstream socket's write buffer is full
P_WAIT = 4  # body bytes pile up while no upstream connection is ready (or a 101 is awaited)
P_DEAD = 8  # the request stream is unusable (parse error): nothing more is read

# What the connection timer is measuring.
T_NONE = 0
T_IDLE = 1  # keep-alive connection between requests
T_HEADERS = 2  # a request head is arriving
T_RESPONSE = 3  # the route timeout of the request in flight
T_LINGER = 4  # discarding input after the last answer, before closing

# Connection modes other than plain request/response.
M_NORMAL = 0
M_UPGRADING = 1  # an Upgrade request was parsed: what follows is tunnel data (or nothing)
M_TUNNEL = 2  # after a 101: raw bytes both ways
M_LINGER = 3  # answered and closing: input is discarded

LINGER_SECONDS = 2.0
NEVER = 10 * 365 * 86400.0
_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class _Labels:
    """Metric label tuples of one (listener, route, cluster), built once and reused."""

    __slots__ = ("by_class", "duration", "retries")

    def __init__(self, listener: str, route: str, cluster: str) -> None:
        self.by_class = tuple((listener, route, cluster, c) for c in _CLASSES)
        self.duration = (listener, route)
        self.retries = (listener, route, cluster)


_label_cache: dict[tuple[str, str, str], _Labels] = {}


def labels_for(listener: str, route: str, cluster: str) -> _Labels:
    key = (listener, route, cluster)
    labels = _label_cache.get(key)
    if labels is None:
        labels = _label_cache[key] = _Labels(listener, route, cluster)
    return labels


class HttpExchange(asyncio.Protocol):
    """State shared by both halves of a client connection, and the upstream half."""

    # Slots: a fixed layout keeps every attribute access of the hot path a slot read.
    __slots__ = (
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
        "hc_method",
        "hc_parts",
        "hc_url",
        "header_timeout",
        "idle_timeout",
        "kicking",
        "last_cluster",
        "last_labels",
        "last_route",
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
        "stats",
        "timer",
        "timer_at",
        "timer_kind",
        "transport",
        "write_paused",
    )

    def __init__(self, listener: ListenerHandle) -> None:
        self.listener = listener
        self.stats = listener.stats
        self.name = listener.name
        self.loop = asyncio.get_running_loop()
        settings = listener.config.http
        self.forwarded = settings.xff
        # 0 disables a timeout: a deadline that never comes keeps the hot path branch-free.
        self.idle_timeout = settings.idle_timeout or NEVER
        self.header_timeout = settings.header_timeout or NEVER
        self.transport: asyncio.Transport | None = None
        self.client_ip = b""
        self.queue: deque[Request] = deque()  # the first is in flight; the rest wait
        self.parsing: Request | None = None  # message begun, not complete
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
        self.last_labels = self.no_route_labels = labels_for(self.name, "", "")
        # The upstream head of the last request built on this connection, and what it was
        # built from (see _attach).
        self.hc_parts: list[bytes] | None = None
        self.hc_url = b""
        self.hc_method = b""
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

    def _response_timeout(self, req: Request) -> None:
        if req.sent:
            self._drop_upstream(req)
            self._finish(req, abort=True)
            return
        endpoint = req.endpoint
        if endpoint is not None and req.cluster is not None and not req.waiting:
            req.cluster.record_failure(endpoint)
        self._fail(req, "timeout")

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
                endpoint = cluster.balancer.pick(available, req.hash_key)
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

    def _try(self, req: Request, exclude: Endpoint | None) -> None:
        cluster = req.cluster
        assert cluster is not None and req.route is not None
        if exclude is None:
            # Cluster.pick, inlined: this runs for every request.
            available = cluster.available
            endpoint = cluster.balancer.pick(available, req.hash_key) if available else None
        else:
            endpoint = cluster.pick(req.hash_key, exclude)
        if endpoint is None:
            self._local(req, 503, b"no healthy upstream\n")
            return
        self._try_endpoint(req, endpoint)

    def _try_endpoint(self, req: Request, endpoint: Endpoint) -> None:
        cluster = req.cluster
        assert cluster is not None and req.route is not None
        endpoint.active += 1
        req.endpoint = endpoint
        conn = pool.take_idle(endpoint) if endpoint.idle else None
        if conn is None:
            if cluster.connections >= cluster.max_connections and (
                pool.has_waiters(cluster) or not pool.steal_idle(cluster)
            ):
                if cluster.pending >= cluster.max_pending:
                    self._release(req)
                    self._overflow(req, cluster, "max_pending")
                    return
                req.waiting = True
                pool.wait_for_slot(cluster, self)
            else:
                req.connecting = True
                self.conn = pool.connect(endpoint, self, self.stats)
        if req.expect_continue:
            self._continue(req)
        if conn is not None:
            self._attach(req, conn)
        retries = req.route.retries
        if retries is not None and retries.per_try_timeout and not req.done:
            req.try_timer = self.loop.call_later(retries.per_try_timeout, self._try_timeout, req)

    def _continue(self, req: Request) -> None:
        # Expect: 100-continue is answered here, once the request is routed and about to be
        # forwarded; the upstream never sees the Expect header (Envoy's default).
        if not req.continued and not req.body_started and self.transport is not None and not self.closed:
            req.continued = True
            self.transport.write(CONTINUE_100)

    def _attach(self, req: Request, conn: UpstreamConnection) -> None:
        """Write the request (head and the body so far) to a ready connection."""
        self.conn = conn
        req.conn = conn
        req.connecting = False
        if self.write_paused:
            conn.pause_reading()
        head = req.head
        if not head:
            if (
                req.parts == self.hc_parts
                and req.url == self.hc_url
                and req.method == self.hc_method
                and req.host
                and not req.conn_extra
                and not req.chunked
                and not req.upgrade
                and req.xff is None
                and req.via is None
            ):
                # The same head as this connection's previous request (keep-alive clients
                # repeat themselves): build_head would return the same bytes.
                head = req.head = self.hc_head
            else:
                head = req.head = req.build_head(self.client_ip, self.forwarded, conn.endpoint.key.encode())
                if (
                    req.host
                    and not req.conn_extra
                    and not req.chunked
                    and not req.upgrade
                    and req.xff is None
                    and req.via is None
                ):
                    self.hc_parts, self.hc_url, self.hc_method, self.hc_head = req.parts, req.url, req.method, head
        if req.pending:
            conn.send(self, b"".join((head, *req.pending)), req.method == b"HEAD")
            req.pending = []
            req.pending_size = 0
        else:
            conn.send(self, head, req.method == b"HEAD")
        if self.read_pause & P_WAIT:
            self._unpause(P_WAIT)

    def _release(self, req: Request) -> None:
        """Give back what the current try of ``req`` holds (endpoint, pending slot, timer)."""
        if req.try_timer is not None:
            req.try_timer.cancel()
            req.try_timer = None
        if req.waiting:
            req.waiting = False
            assert req.cluster is not None
            pool.stop_waiting(req.cluster, self)
        req.conn = None
        req.connecting = False
        if req.endpoint is not None:
            req.endpoint.active -= 1
            req.endpoint = None

    def _drop_upstream(self, req: Request) -> None:
        """Abandon the current try: its connection cannot be reused mid-request."""
        conn, self.conn = self.conn, None
        if conn is not None and conn.owner is self:
            if req.connecting:
                conn.owner = None  # let the connect finish; the connection is then pooled
            else:
                conn.abort()
        self._release(req)

    # -- upstream callbacks --------------------------------------------------------------------

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        req = self.queue[0] if self.queue else None
        if req is not None and not self.closed:
            if req.connecting and conn is self.conn:
                self._attach(req, conn)
                return
            if req.waiting and self.conn is None:
                req.waiting = False
                if conn.endpoint is not req.endpoint:
                    # Handed a connection to another endpoint of the cluster: use it.
                    if req.endpoint is not None:
                        req.endpoint.active -= 1
                    conn.endpoint.active += 1
                    req.endpoint = conn.endpoint
                self._attach(req, conn)
                return
        pool.release(conn, not conn.expecting)

    def upstream_slot(self) -> None:
        req = self.queue[0] if self.queue else None
        if req is None or not req.waiting or self.closed or req.endpoint is None:
            return
        req.waiting = False
        req.connecting = True
        self.conn = pool.connect(req.endpoint, self, self.stats)

    def upstream_head(self, conn: UpstreamConnection) -> None:
        if conn is not self.conn or not self.queue:
            return
        req = self.queue[0]
        if req.try_timer is not None:
            req.try_timer.cancel()
            req.try_timer = None
        status = conn.status
        cluster = req.cluster
        endpoint = req.endpoint
        assert cluster is not None and endpoint is not None
        if status >= 500:
            cluster.record_failure(endpoint)
            if self._can_retry(req, "gateway-error" if status in (502, 503, 504) else "5xx"):
                self._drop_upstream(req)
                self._retry(req, endpoint)
                return
        elif endpoint.consecutive_failures:
            cluster.record_success(endpoint)
        if status == 101:
            if not req.upgrade or conn.upgrade_value is None:
                self._drop_upstream(req)
                self._fail(req, "protocol")
                return
            self._start_tunnel(req, conn)
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
                req.resp_chunked = True
                if conn.chunked:  # keep other codings it names (gzip, chunked)
                    out += (b"Transfer-Encoding: ", conn.te_value, CRLF)
                else:
                    out.append(CHUNKED_LINE)
        if close:
            out.append(CLOSE_LINE)
        elif req.http10:
            out.append(KEEP_ALIVE_LINE)
        if self.forwarded:
            out.append(VIA_LINE)
        out.append(CRLF)
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
        if conn is not self.conn or not self.queue:
            return
        req = self.queue[0]
        out = self.out
        if req.resp_chunked:
            out.append(LAST_CHUNK)
        if out:  # _flush, inlined
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.out = []
        self.conn = None
        if self.read_pause & P_UPSTREAM:
            self._unpause(P_UPSTREAM)
        pool.release(conn, conn.keep_alive and req.complete)
        self._finish(req)

    def upstream_failed(self, conn: UpstreamConnection, kind: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        if self.mode == M_TUNNEL:
            self._close()
            return
        req = self.queue[0]
        endpoint = req.endpoint
        assert endpoint is not None and req.cluster is not None
        self._unpause(P_UPSTREAM)
        # A reused keep-alive connection that the server closed just as we wrote to it: the
        # request never reached the application, so one more try is safe and not a failure.
        if (
            kind == "reset"
            and conn.reused
            and not conn.got_bytes
            and not req.retried_reuse
            and not req.sent
            and req.wire is not None
            and req.method_str in IDEMPOTENT_METHODS
        ):
            req.retried_reuse = True
            self._release(req)
            self._retry(req, None, count=False)
            return
        req.cluster.record_failure(endpoint)
        self._release(req)
        if req.sent:
            # The response was partly written: the client can only learn of the failure by
            # the connection ending early.
            self._finish(req, abort=True)
            return
        if self._can_retry(req, "connect-failure" if kind == "connect" else "reset"):
            self._retry(req, endpoint)
            return
        self._fail(req, kind)

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

    # -- retries and failures ------------------------------------------------------------------

    def _can_retry(self, req: Request, condition: str) -> bool:
        if req.tries_left <= 0 or req.sent or req.wire is None or self.closed:
            return False
        assert req.route is not None and req.route.retries is not None
        on = req.route.retries.on
        return condition in on or "5xx" in on

    def _retry(self, req: Request, failed: Endpoint | None, count: bool = True) -> None:
        if count:
            req.tries_left -= 1
            self.stats.http_retries.inc(self._labels_of(req).retries)
        req.pending = list(req.wire or ())
        req.pending_size = req.wire_size
        self._try(req, failed)

    def _fail(self, req: Request, kind: str) -> None:
        if kind == "connect":
            self._local(req, 503, b"upstream connect error\n")
        elif kind == "timeout":
            self._local(req, 504, b"upstream request timeout\n")
        else:
            self._local(req, 502, b"upstream connection reset or malformed response\n")

    def _try_timeout(self, req: Request) -> None:
        req.try_timer = None
        if not self.queue or self.queue[0] is not req or req.sent or req.done:
            return
        endpoint = req.endpoint
        if endpoint is not None and req.cluster is not None and not req.waiting:
            req.cluster.record_failure(endpoint)
        self._drop_upstream(req)
        if self._can_retry(req, "gateway-error"):
            self._retry(req, endpoint)
        else:
            self._fail(req, "timeout")

    def _overflow(self, req: Request, cluster: Cluster, limit: str) -> None:
        cluster.overflows += 1
        self.stats.upstream_overflows.inc((cluster.name, limit))
        what = b"max_requests" if limit == "max_requests" else b"max_connections and max_pending"
        self._local(req, 503, b"upstream overflow: %b reached\n" % what)

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

    def _labels_of(self, req: Request) -> _Labels:
        route, cluster = req.route, req.cluster
        if route is None or cluster is None:
            return self.no_route_labels
        if route is self.last_route and cluster is self.last_cluster:
            return self.last_labels
        labels = labels_for(self.name, route.name, cluster.name)
        self.last_route, self.last_cluster, self.last_labels = route, cluster, labels
        return labels

    def _finish(self, req: Request, abort: bool = False) -> None:
        """The response of the request at the front of the queue is written (or failed)."""
        req.done = True
        if req.pending:
            req.pending = []
        endpoint = req.endpoint
        if req.try_timer is not None or req.waiting:
            self._release(req)
        elif endpoint is not None:
            # _release, inlined for the usual case (no try timer, not waiting).
            req.connecting = False
            endpoint.active -= 1
            req.endpoint = None
        req.conn = None
        if req.counted:
            req.counted = False
            assert req.cluster is not None
            req.cluster.requests -= 1
        now = self.loop.time()
        status = req.status
        if status:
            if req.route is self.last_route and req.cluster is self.last_cluster:
                labels = self.last_labels
            else:
                labels = self._labels_of(req)
            stats = self.stats
            stats.http_requests.values[labels.by_class[status // 100]] += 1  # .inc(), inlined
            duration = stats.http_duration
            elapsed = now - req.start
            row = duration.series.get(labels.duration)
            if row is None:
                duration.observe(labels.duration, elapsed)
            else:  # .observe(), inlined
                row[bisect_left(duration.buckets, elapsed)] += 1
                row[-1] += elapsed
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
            self._arm(T_HEADERS, self.parsing.start + self.header_timeout)
        else:
            if self.read_pause & P_PIPELINE:
                self._unpause(P_PIPELINE)
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
        self.stats.http_duration.observe(labels.duration, self.loop.time() - req.start)
        # The request stays at the front of the queue, holding its endpoint and cluster
        # slots, until the tunnel ends (connection_lost releases them).
        if req.try_timer is not None:
            req.try_timer.cancel()
            req.try_timer = None
        early, self.early = self.early, []
        for data in early:
            conn.write(data)
        self._unpause(P_WAIT)
