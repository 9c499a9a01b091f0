"""Upstream clusters: endpoints, their health and ejection state, and the balancer over them.

State changes (a health check flips, an outlier is ejected or returns) recompute the list of
available endpoints once, so the per-request path (:meth:`Cluster.pick`) is a list read and a
balancer call. Ejections end by a timer on the event loop rather than by checking clocks on
every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from router.balancers import Balancer, make_balancer
from router.config import ClusterConfig, OutlierConfig, format_address

log = logging.getLogger("pointsman.router.cluster")


class Endpoint:
    """One upstream address of a cluster."""

    __slots__ = (
        "active",
        "address",
        "available",
        "cluster",
        "connections",
        "consecutive_failures",
        "ejected",
        "ejected_until",
        "ejections",
        "healthy",
        "host",
        "idle",
        "key",
        "port",
        "removed",
    )

    def __init__(self, cluster: Cluster, address: tuple[str, int]) -> None:
        self.cluster = cluster
        self.address = address
        self.host, self.port = address
        self.key = format_address(address)
        self.healthy = True  # active health checks; no checks means always healthy
        self.ejected = False  # passive outlier detection
        self.ejected_until = 0.0
        self.ejections = 0  # how many times ejected so far: ejection time grows with it
        self.consecutive_failures = 0
        self.available = True  # healthy and not ejected; maintained by the cluster
        self.active = 0  # requests (or TCP sessions) in flight, for least_request
        self.connections = 0  # open upstream connections
        # Idle keep-alive upstream connections, most recently used last. The HTTP proxy owns
        # what goes in here; the cluster only closes them when it stops.
        self.idle: deque[Any] = deque()
        self.removed = False  # left the cluster (registry change): requests in flight finish

    def snapshot(self) -> dict[str, object]:
        return {
            "address": self.key,
            "healthy": self.healthy,
            "ejected": self.ejected,
            "ejected_for": max(0.0, round(self.ejected_until - time.monotonic(), 3)) if self.ejected else 0.0,
            "ejections": self.ejections,
            "consecutive_failures": self.consecutive_failures,
            "available": self.available,
            "active_requests": self.active,
            "connections": self.connections,
            "idle_connections": len(self.idle),
        }


class Cluster:
    """A named set of endpoints with a balancer, health state, outlier ejection and limits."""

    def __init__(self, name: str, config: ClusterConfig) -> None:
        self.name = name
        self.config = config
        self.endpoints = [Endpoint(self, address) for address in dict.fromkeys(config.endpoints)]
        self.balancer: Balancer = make_balancer(config.balancer, self.endpoints)
        self.available: list[Endpoint] = list(self.endpoints)
        limits = config.limits
        self.max_connections = limits.max_connections
        self.max_pending = limits.max_pending
        self.max_requests = limits.max_requests
        # Read per request: plain attributes, not pydantic lookups.
        self.hashed = config.balancer == "hash"
        self.idle_timeout = config.idle_timeout
        # Circuit-breaker counters, shared by every listener that routes here.
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.overflows = 0  # requests refused because a limit was full
        self.stopped = False  # set when a reload retires it: connections then close, not pool
        self._timers: dict[Endpoint, asyncio.TimerHandle] = {}
        self._health_task: asyncio.Task[None] | None = None
        self.on_change: list[Callable[[Cluster], None]] = []

    # -- the request path ------------------------------------------------------------

    def pick(self, key: bytes | None = None, exclude: Endpoint | None = None) -> Endpoint | None:
        """An available endpoint, or None when none is (the caller answers 503)."""
        available = self.available
        if not available:
            return None
        if exclude is not None and len(available) > 1 and exclude in available:
            available = [e for e in available if e is not exclude]
        return self.balancer.pick(available, key)

    def record_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def record_failure(self, endpoint: Endpoint) -> None:
        """A connect failure, reset, timeout or 5xx from the endpoint (passive health)."""
        endpoint.consecutive_failures += 1
        outlier = self.config.outlier
        if outlier is None or endpoint.ejected:
            return
        if endpoint.consecutive_failures >= outlier.consecutive_failures:
            self._eject(endpoint, outlier)

    # -- state changes -----------------------------------------------------------------

    def _eject(self, endpoint: Endpoint, outlier: OutlierConfig) -> None:
        ejected = sum(1 for e in self.endpoints if e.ejected)
        if (ejected + 1) * 100 > outlier.max_ejected_percent * len(self.endpoints):
            # Ejecting one more would cross the cap: keep serving from it, as Envoy does.
            return
        endpoint.ejections += 1
        duration = min(outlier.base_ejection * endpoint.ejections, max(outlier.max_ejection, outlier.base_ejection))
        endpoint.ejected = True
        endpoint.ejected_until = time.monotonic() + duration
        log.warning(
            "cluster %s: ejected %s for %.1fs after %d consecutive failures",
            self.name,
            endpoint.key,
            duration,
            endpoint.consecutive_failures,
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._timers[endpoint] = loop.call_later(duration, self._uneject, endpoint)
        self._recompute()

    def _uneject(self, endpoint: Endpoint) -> None:
        self._timers.pop(endpoint, None)
        endpoint.ejected = False
        endpoint.consecutive_failures = 0
        log.info("cluster %s: %s returns from ejection", self.name, endpoint.key)
        self._recompute()

    def set_healthy(self, endpoint: Endpoint, healthy: bool) -> None:
        if endpoint.healthy == healthy:
            return
        endpoint.healthy = healthy
        log.warning("cluster %s: endpoint %s is now %s", self.name, endpoint.key, "healthy" if healthy else "unhealthy")
        self._recompute()

    def _recompute(self) -> None:
        for endpoint in self.endpoints:
            endpoint.available = endpoint.healthy and not endpoint.ejected
        self.available = [e for e in self.endpoints if e.available]
        for callback in self.on_change:
            callback(self)

    def set_endpoints(self, addresses: list[tuple[str, int]]) -> None:
        """Follow a new endpoint set (a registry change). Endpoints that stay keep their state;
        new ones start healthy (the registry only offers usable instances); ones that leave
        take no new requests, their idle connections close, and requests in flight finish."""
        wanted = list(dict.fromkeys(addresses))
        if wanted == [e.address for e in self.endpoints]:
            return
        current = {e.address: e for e in self.endpoints}
        endpoints = [current.pop(address) if address in current else Endpoint(self, address) for address in wanted]
        for gone in current.values():
            gone.removed = True
            gone.available = False
            timer = self._timers.pop(gone, None)
            if timer is not None:
                timer.cancel()
            while gone.idle:
                conn = gone.idle.pop()
                close = getattr(conn, "close", None)
                if close is not None:
                    close()
        self.endpoints = endpoints
        self.balancer = make_balancer(self.config.balancer, self.endpoints)
        log.info("cluster %s: %d endpoints (%s)", self.name, len(endpoints), ", ".join(e.key for e in endpoints))
        self._recompute()
        if self._health_task is not None:  # the checker works on a fixed list: restart it
            self._health_task.cancel()
            self._health_task = None
            self.start()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start active health checks, if configured. Needs a running loop."""
        if self.config.health is not None and self._health_task is None:
            from router.health import HealthChecker

            checker = HealthChecker(self)
            self._health_task = asyncio.get_running_loop().create_task(checker.run(), name=f"health:{self.name}")

    async def stop(self) -> None:
        self.stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for endpoint in self.endpoints:
            while endpoint.idle:
                conn = endpoint.idle.pop()
                close = getattr(conn, "close", None)
                if close is not None:
                    close()

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "balancer": self.config.balancer,
            "connections": self.connections,
            "pending": self.pending,
            "requests": self.requests,
            "overflows": self.overflows,
            "limits": self.config.limits.model_dump(),
            "endpoints": [e.snapshot() for e in self.endpoints],
        }
