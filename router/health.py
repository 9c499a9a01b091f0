"""Active health checks of a cluster's endpoints.

One task per endpoint, all under one TaskGroup owned by :meth:`HealthChecker.run`: every
endpoint is checked at once when checking starts, then every ``interval``, each endpoint
shifted by a fraction of the interval so that a large cluster's checks do not all fire in
the same tick. A check is an HTTP GET (2xx/3xx passes) when ``health.http`` is set, else a
TCP connect; either must finish within ``health.timeout``.

An endpoint flips to unhealthy after ``unhealthy_after`` failures in a row and back after
``healthy_after`` passes in a row; the cluster then recomputes its available endpoints.
Only flips are logged, with the reason of the last check.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from router.cluster import Cluster, Endpoint
from router.config import HealthConfig, format_address

log = logging.getLogger("pointsman.router.health")


class HealthChecker:
    def __init__(self, cluster: Cluster) -> None:
        assert cluster.config.health is not None, "a HealthChecker needs a cluster with a health section"
        self.cluster = cluster
        self.config: HealthConfig = cluster.config.health
        self._session: aiohttp.ClientSession | None = None
        # Consecutive results per endpoint; only the current streak matters.
        self._passes: dict[Endpoint, int] = {}
        self._failures: dict[Endpoint, int] = {}

    async def run(self) -> None:
        """Check until cancelled; cancellation closes the HTTP session before returning."""
        try:
            if self.config.http is not None:
                # force_close: a fresh connection per check. A pooled keep-alive connection
                # that the server closed while idle would fail the next check spuriously,
                # and a fresh connect also exercises what a real request goes through.
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True, limit=0),
                    auto_decompress=False,
                )
            endpoints = self.cluster.endpoints
            async with asyncio.TaskGroup() as group:
                for index, endpoint in enumerate(endpoints):
                    phase = self.config.interval * index / len(endpoints)
                    group.create_task(self._watch(endpoint, phase), name=f"health:{endpoint.key}")
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    async def _watch(self, endpoint: Endpoint, phase: float) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        # A fixed schedule (not "sleep interval after each check"), so a slow check does
        # not stretch the period; a check that overruns its slot skips the missed ones.
        due = loop.time() + phase
        while True:
            error = await self._check(endpoint)
            self._record(endpoint, error)
            due += interval
            now = loop.time()
            if due < now:
                due = now
            await asyncio.sleep(due - now)

    async def _check(self, endpoint: Endpoint) -> str | None:
        """None when the endpoint passes, else why it failed."""
        try:
            async with asyncio.timeout(self.config.timeout):
                if self._session is not None:
                    return await self._check_http(self._session, endpoint)
                return await self._check_tcp(endpoint)
        except TimeoutError:
            return f"no answer within {self.config.timeout}s"
        except (OSError, aiohttp.ClientError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            # Anything else is still this endpoint's failure, not a reason to stop checking
            # the whole cluster (an exception here would end the TaskGroup).
            log.debug("cluster %s: health check of %s raised", self.cluster.name, endpoint.key, exc_info=True)
            return f"{type(exc).__name__}: {exc}"

    async def _check_http(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> str | None:
        path = self.config.http
        assert path is not None
        url = f"http://{format_address(endpoint.address)}{path}"
        headers = {"Host": self.config.host or endpoint.key}
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            # Read the (small) body so the response is complete before the connection closes.
            await response.read()
            if 200 <= response.status < 400:
                return None
            return f"HTTP {response.status}"

    async def _check_tcp(self, endpoint: Endpoint) -> str | None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, endpoint.host, endpoint.port)
        transport.close()
        return None

    def _record(self, endpoint: Endpoint, error: str | None) -> None:
        cluster = self.cluster
        if error is None:
            self._failures[endpoint] = 0
            passes = self._passes[endpoint] = self._passes.get(endpoint, 0) + 1
            if not endpoint.healthy and passes >= self.config.healthy_after:
                log.info("cluster %s: %s passed %d health checks in a row", cluster.name, endpoint.key, passes)
                cluster.set_healthy(endpoint, True)
        else:
            self._passes[endpoint] = 0
            failures = self._failures[endpoint] = self._failures.get(endpoint, 0) + 1
            if endpoint.healthy and failures >= self.config.unhealthy_after:
                log.warning(
                    "cluster %s: %s failed %d health checks in a row, last: %s",
                    cluster.name,
                    endpoint.key,
                    failures,
                    error,
                )
                cluster.set_healthy(endpoint, False)
