"""Active health checks against real servers: HTTP (aiohttp apps) and TCP connects."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from aiohttp import web

from router.cluster import Cluster, Endpoint
from router.config import ClusterConfig
from router.listeners import Router
from tests.support import echo_server, http_upstream, running_router, wait_until

FAST = {"interval": "50ms", "timeout": "500ms"}


class HealthApp:
    """An upstream whose /healthz answers ``status`` (switchable) and records every check;
    /who answers its name, so traffic through the proxy shows where it went."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.status = 200
        self.delay = delay
        self.served: list[int] = []  # status of every health check answered, in order
        self.hosts: list[str] = []
        self.arrivals: list[float] = []
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/who", self._who)

    async def _healthz(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.hosts.append(request.host)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.status
        self.served.append(status)
        return web.Response(status=status, text="ok" if status < 400 else "sick")

    async def _who(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)


def addr(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def config(*endpoints: tuple[str, int], health: dict[str, Any], **cluster: Any) -> dict[str, Any]:
    return {
        "clusters": {"c": {"endpoints": [addr(e) for e in endpoints], "health": health, **cluster}},
        "listeners": [{"name": "tcp", "listen": "127.0.0.1:0", "protocol": "tcp", "to": "c"}],
    }


@contextmanager
def unbound_listener() -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """A bound socket that does not listen yet: connects are refused until ``listen()``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock, cast(tuple[str, int], sock.getsockname()[:2])
    finally:
        sock.close()


async def get_through_proxy(router: Router, path: str) -> bytes:
    """A raw HTTP/1.1 request through the TCP listener; the response body."""
    reader, writer = await asyncio.open_connection(*router.address_of("tcp"))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(3):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def record_flips(cluster: Cluster, endpoint: Endpoint, app: HealthApp) -> list[tuple[bool, list[int]]]:
    """At each availability change of ``endpoint``: its new state and the checks answered so far."""
    flips: list[tuple[bool, list[int]]] = []
    last = [endpoint.healthy]

    def on_change(_: Cluster) -> None:
        if endpoint.healthy != last[0]:
            last[0] = endpoint.healthy
            flips.append((endpoint.healthy, list(app.served)))

    cluster.on_change.append(on_change)
    return flips


async def test_http_check_flips_after_n_failures_and_back_after_m_passes() -> None:
    app = HealthApp("a")
    health = {"http": "/healthz", "host": "svc.internal", "unhealthy_after": 3, "healthy_after": 2, **FAST}
    async with http_upstream(app.app) as upstream, running_router(config(upstream, health=health)) as router:
        cluster = router.clusters["c"]
        endpoint = cluster.endpoints[0]
        flips = record_flips(cluster, endpoint, app)
        await wait_until(lambda: len(app.served) >= 2, what="first checks")
        assert endpoint.healthy

        app.status = 500
        await wait_until(lambda: not endpoint.healthy, what="unhealthy")
        healthy, served = flips[0]
        assert not healthy
        # Exactly `unhealthy_after` failures in a row, not one fewer.
        assert served[-3:] == [500, 500, 500] and served[-4] == 200
        assert cluster.available == []

        app.status = 302  # redirects pass (3xx), and are not followed
        await wait_until(lambda: endpoint.healthy, what="healthy again")
        healthy, served = flips[1]
        assert healthy
        assert served[-2:] == [302, 302] and served[-3] == 500
        assert cluster.available == [endpoint]
        assert len(flips) == 2
        assert set(app.hosts) == {"svc.internal"}


async def test_http_host_header_defaults_to_the_endpoint_address() -> None:
    app = HealthApp("a")
    health = {"http": "/healthz", **FAST}
    async with http_upstream(app.app) as upstream, running_router(config(upstream, health=health)):
        await wait_until(lambda: len(app.hosts) >= 1, what="a check")
        assert app.hosts[0] == addr(upstream)


async def test_tcp_check_marks_a_closed_port_unhealthy_and_traffic_avoids_it() -> None:
    health = {"unhealthy_after": 2, "healthy_after": 2, **FAST}
    with unbound_listener() as (sock, dead):
        async with echo_server() as echo, running_router(config(dead, echo, health=health)) as router:
            cluster = router.clusters["c"]
            bad, good = cluster.endpoints
            await wait_until(lambda: not bad.healthy, what="closed port marked unhealthy")
            assert good.healthy and cluster.available == [good]
            failures = router.stats.upstream_connect_failures.get(("c",))
            for i in range(6):
                reader, writer = await asyncio.open_connection(*router.address_of("tcp"))
                writer.write(b"ping %d" % i)
                writer.write_eof()
                async with asyncio.timeout(3):
                    assert await reader.read() == b"ping %d" % i
                writer.close()
                await writer.wait_closed()
            # Round robin over the available endpoints only: no session tried the dead one.
            assert router.stats.upstream_connect_failures.get(("c",)) == failures

            sock.listen(16)  # the port comes alive: connects now succeed (queued, never accepted)
            await wait_until(lambda: bad.healthy, what="healthy once listening")
            assert cluster.available == [bad, good]


async def test_http_traffic_avoids_the_unhealthy_endpoint() -> None:
    a, b = HealthApp("a"), HealthApp("b")
    health = {"http": "/healthz", "unhealthy_after": 1, "healthy_after": 1, **FAST}
    async with (
        http_upstream(a.app) as ua,
        http_upstream(b.app) as ub,
        running_router(config(ua, ub, health=health)) as router,
    ):
        cluster = router.clusters["c"]
        eb = cluster.endpoints[1]
        assert {await get_through_proxy(router, "/who") for _ in range(4)} == {b"a", b"b"}
        b.status = 503
        await wait_until(lambda: not eb.healthy, what="b unhealthy")
        assert {await get_through_proxy(router, "/who") for _ in range(6)} == {b"a"}
        b.status = 204
        await wait_until(lambda: eb.healthy, what="b healthy again")
        assert {await get_through_proxy(router, "/who") for _ in range(4)} == {b"a", b"b"}


async def test_first_checks_are_immediate_concurrent_and_time_out() -> None:
    """Slow endpoints: with checks one after another, the third would start only after the
    first two timed out. Here all start at once, and a slow answer is a failure."""
    apps = [HealthApp(n, delay=0.5) for n in "xyz"]
    health = {"http": "/healthz", "interval": "10s", "timeout": "150ms", "unhealthy_after": 1}
    async with (
        http_upstream(apps[0].app) as u0,
        http_upstream(apps[1].app) as u1,
        http_upstream(apps[2].app) as u2,
        running_router(config(u0, u1, u2, health=health)) as router,
    ):
        cluster = router.clusters["c"]
        # Within 3s although the interval is 10s: the first round runs at once.
        await wait_until(lambda: not cluster.available, timeout=3, what="all unhealthy")
        arrivals = [app.arrivals[0] for app in apps]
        # One after another they would arrive at least a timeout (150ms) apart.
        assert max(arrivals) - min(arrivals) < 0.1
        assert all(len(app.arrivals) == 1 for app in apps)  # next check only after 10s


async def test_stopping_cancels_checks_in_flight_and_closes_the_session() -> None:
    app = HealthApp("a", delay=0.3)
    async with http_upstream(app.app) as upstream:
        cluster = Cluster(
            "c",
            ClusterConfig.model_validate(
                {"endpoints": [upstream], "health": {"http": "/healthz", "interval": "50ms", "timeout": "1s"}}
            ),
        )
        cluster.start()
        task = cluster._health_task
        assert task is not None
        await wait_until(lambda: len(app.arrivals) == 1, what="a check in flight")
        await cluster.stop()
        assert task.done()
        gc.collect()  # an unclosed aiohttp session would warn here (and warnings are errors)
        # Had checking gone on, the next check would arrive once the slow one's 0.3s were up
        # plus the 50ms interval.
        await asyncio.sleep(0.5)
        assert len(app.arrivals) == 1
