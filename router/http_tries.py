"""The tries of the request in flight: getting it a connection (a pooled one, a new one, or a
turn in the cluster's queue for a slot), giving back what a try holds, and what happens when a
try fails: outlier bookkeeping, retries on another endpoint, the proxy's 502/503/504.

:class:`Tries` is a mixin of :class:`router.http_exchange.HttpExchange` (the same object: one
per client connection), kept apart so that module reads as the ordinary life of a request.
The fast path (a pooled connection to the only available endpoint) is inlined in
``HttpExchange._start`` and does not come here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router import http_upstream as pool
from router.http_headers import CONTINUE_100
from router.http_request import Request
from router.http_states import M_TUNNEL, P_UPSTREAM
from router.routes import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    import asyncio
    from collections import deque

    from router.cluster import Cluster, Endpoint
    from router.http_labels import Labels
    from router.http_upstream import UpstreamConnection, UpstreamOwner
    from router.metrics import RouterStats

    _Owner = UpstreamOwner
else:
    _Owner = object


class Tries(_Owner):
    """Mixin of HttpExchange (which has the state and the methods declared below)."""

    __slots__ = ()

    if TYPE_CHECKING:
        queue: deque[Request]
        conn: UpstreamConnection | None
        transport: asyncio.Transport | None
        closed: bool
        mode: int
        loop: asyncio.AbstractEventLoop
        stats: RouterStats

        def _attach(self, req: Request, conn: UpstreamConnection) -> None: ...
        def _local(self, req: Request, status: int, body: bytes, close: bool = False) -> None: ...
        def _finish(self, req: Request, abort: bool = False, now: float = 0.0) -> None: ...
        def _start_tunnel(self, req: Request, conn: UpstreamConnection) -> None: ...
        def _labels_of(self, req: Request) -> Labels: ...
        def _unpause(self, bit: int) -> None: ...
        def _close(self) -> None: ...

    # -- the connection of a try ---------------------------------------------------------------

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

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        req = self.queue[0] if self.queue else None
        if req is not None and not self.closed:
            if req.connecting and conn is self.conn:
                req.connecting = False
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

    # -- failures and retries ------------------------------------------------------------------

    def _unusual_head(self, req: Request, conn: UpstreamConnection, endpoint: Endpoint, status: int) -> bool:
        """Outlier bookkeeping for a 5xx (which may be retried) or the first success after
        failures, and the switch to a tunnel on a 101. True when the head is not to be relayed
        as an ordinary response."""
        cluster = req.cluster
        assert cluster is not None
        if status >= 500:
            cluster.record_failure(endpoint)
            if self._can_retry(req, "gateway-error" if status in (502, 503, 504) else "5xx"):
                self._drop_upstream(req)
                self._retry(req, endpoint)
                return True
        elif endpoint.consecutive_failures:
            cluster.record_success(endpoint)
        if status == 101:
            if not req.upgrade or conn.upgrade_value is None:
                self._drop_upstream(req)
                self._fail(req, "protocol")
            else:
                self._start_tunnel(req, conn)
            return True
        return False

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

    def _response_timeout(self, req: Request) -> None:
        if req.sent:
            self._drop_upstream(req)
            self._finish(req, abort=True)
            return
        endpoint = req.endpoint
        if endpoint is not None and req.cluster is not None and not req.waiting:
            req.cluster.record_failure(endpoint)
        self._fail(req, "timeout")

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

    def _overflow(self, req: Request, cluster: Cluster, limit: str) -> None:
        cluster.overflows += 1
        self.stats.upstream_overflows.inc((cluster.name, limit))
        what = b"max_requests" if limit == "max_requests" else b"max_connections and max_pending"
        self._local(req, 503, b"upstream overflow: %b reached\n" % what)
