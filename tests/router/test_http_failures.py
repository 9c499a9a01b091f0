"""Upstream failures, timeouts, retries, circuit breakers and clients that go away."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
from aiohttp import web

from router.listeners import Router
from tests.router.test_http_helpers import (
    exchange,
    http_config,
    one_cluster,
    raw_client,
    raw_upstream,
    read_request,
    read_response,
    read_until_closed,
    until,
)
from tests.support import http_upstream, running_router

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@contextmanager
def refused_address() -> Iterator[tuple[str, int]]:
    """An address where connecting fails at once: a bound socket that does not listen (held
    for the whole test, so no other process can take the port meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[:2]
    finally:
        sock.close()


def status_app(status: int, name: str) -> web.Application:
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, text=f"{name} says {status}")

    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@asynccontextmanager
async def stalled_upstream() -> AsyncIterator[tuple[tuple[str, int], asyncio.Event, asyncio.Event]]:
    """An upstream that reads a request and never answers until ``release`` is set; yields
    (address, arrived, release). It then answers 200 "late"."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            arrived.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")

    async with raw_upstream(handler) as address:
        yield address, arrived, release


def endpoints(*addresses: tuple[str, int]) -> list[str]:
    return [f"{h}:{p}" for h, p in addresses]


def _retry_config(addresses: list[str], retries: dict[str, Any], **route: Any) -> dict[str, Any]:
    return http_config(
        {"up": {"endpoints": addresses}},
        [{"name": "r", "match": {"path_prefix": "/"}, "to": "up", "retries": retries, **route}],
    )


def assert_idle(router: Router) -> None:
    for cluster in router.clusters.values():
        assert cluster.requests == 0, cluster.snapshot()
        assert cluster.pending == 0, cluster.snapshot()
        for endpoint in cluster.endpoints:
            assert endpoint.active == 0, cluster.snapshot()


async def test_connect_failure_is_503() -> None:
    with refused_address() as address:
        async with running_router(one_cluster(address)) as router:
            response = await exchange(router.address_of("web")[1], GET)
            assert response.status == 503
            assert response.body == b"upstream connect error\n"
            assert router.stats.upstream_connect_failures.get(("up",)) == 1
            assert router.stats.http_requests.get(("web", "", "", "", "", "all", "up", "5xx")) == 1
            cluster = router.clusters["up"]
            assert cluster.connections == 0 and cluster.endpoints[0].connections == 0
            assert cluster.endpoints[0].consecutive_failures == 1
            assert_idle(router)


async def test_reset_and_malformed_response_are_502() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await reader.read()

    for handler in (reset, garbage):
        async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
            response = await exchange(router.address_of("web")[1], GET)
            assert response.status == 502, handler
            assert router.clusters["up"].endpoints[0].consecutive_failures == 1
            assert_idle(router)


async def test_route_timeout_is_504_and_counts_as_a_failure() -> None:
    async with (
        stalled_upstream() as (address, _, _),
        running_router(one_cluster(address, route={"timeout": "300ms"})) as router,
    ):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(GET)
            response = await asyncio.wait_for(read_response(reader), 5)
            assert response.status == 504
            # the client connection stays usable after a 504
            writer.write(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 5)).status == 504
        assert router.clusters["up"].endpoints[0].consecutive_failures == 2
        assert_idle(router)


async def test_route_timeout_after_the_response_started_cuts_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await reader.read()

    async with (
        raw_upstream(handler) as address,
        running_router(one_cluster(address, route={"timeout": "300ms"})) as router,
    ):
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            writer.write(GET)
            raw = await asyncio.wait_for(read_until_closed(reader), 5)
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"partial")
        assert_idle(router)


async def test_per_try_timeout_retries_on_another_endpoint() -> None:
    async with stalled_upstream() as (slow, arrived, _), http_upstream(status_app(200, "fast")) as fast:
        config = _retry_config(
            endpoints(slow, fast), {"attempts": 1, "on": ["gateway-error"], "per_try_timeout": "200ms"}, timeout="5s"
        )
        async with running_router(config) as router:
            port = router.address_of("web")[1]
            for _ in range(2):  # round robin: one of the two starts at the slow endpoint
                response = await exchange(port, GET)
                assert response.status == 200 and response.body == b"fast says 200"
            assert arrived.is_set()
            assert router.stats.http_retries.get(("web", "", "", "", "", "r", "up")) == 1
            assert_idle(router)


async def test_connect_failure_retried_on_another_endpoint() -> None:
    with refused_address() as dead:
        async with http_upstream(status_app(200, "alive")) as alive:
            config = _retry_config(endpoints(dead, alive), {"attempts": 2, "on": ["connect-failure"]})
            async with running_router(config) as router:
                port = router.address_of("web")[1]
                for _ in range(6):
                    response = await exchange(port, GET)
                    assert response.status == 200
                assert router.stats.http_retries.get(("web", "", "", "", "", "r", "up")) == 3
                assert router.stats.upstream_connect_failures.get(("up",)) == 3
                assert_idle(router)


async def test_5xx_retried_only_when_the_policy_says_so() -> None:
    async with http_upstream(status_app(503, "bad")) as bad, http_upstream(status_app(200, "good")) as good:
        for on, expect_all_ok in ((["gateway-error"], True), (["5xx"], True), (["connect-failure"], False)):
            config = _retry_config(endpoints(bad, good), {"attempts": 1, "on": on})
            async with running_router(config) as router, aiohttp.ClientSession() as session:
                base = "http://{}:{}".format(*router.address_of("web"))
                statuses = []
                for _ in range(4):
                    async with session.get(base + "/") as response:
                        statuses.append((response.status, await response.text()))
                if expect_all_ok:
                    assert statuses == [(200, "good says 200")] * 4, on
                else:
                    # not retried: the upstream's own 503 is forwarded, body and all
                    assert (503, "bad says 503") in statuses, on
                assert_idle(router)


async def test_retries_exhausted_forward_the_upstream_5xx() -> None:
    async with http_upstream(status_app(502, "one")) as one, http_upstream(status_app(502, "two")) as two:
        config = _retry_config(endpoints(one, two), {"attempts": 2, "on": ["5xx"]})
        async with running_router(config) as router:
            response = await exchange(router.address_of("web")[1], GET)
            assert response.status == 502
            assert response.body in (b"one says 502", b"two says 502")
            assert router.stats.http_retries.get(("web", "", "", "", "", "r", "up")) == 2
            assert_idle(router)


async def test_no_retry_for_post_or_for_a_large_body() -> None:
    resets = 0

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal resets
        await read_request(reader)
        resets += 1
        writer.transport.abort()

    async with raw_upstream(reset) as dead, http_upstream(status_app(200, "good")) as good:
        config = _retry_config(endpoints(dead, good), {"attempts": 3, "on": ["reset"]})
        async with running_router(config) as router:
            port = router.address_of("web")[1]
            small = b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
            big = b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
            post = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
            results = {}
            for name, request in (("small", small), ("big", big), ("post", post)):
                results[name] = sorted([(await exchange(port, request)).status for _ in range(2)])
            assert results["small"] == [200, 200]  # PUT is idempotent and the body was kept
            assert results["big"] == [200, 502]  # too big to keep for a second try
            assert results["post"] == [200, 502]
            assert_idle(router)


async def test_max_requests_overflow_is_503_at_once() -> None:
    async with (
        stalled_upstream() as (address, arrived, release),
        running_router(one_cluster(address, limits={"max_requests": 1})) as router,
    ):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(GET)
            await asyncio.wait_for(arrived.wait(), 5)
            refused = await exchange(port, GET)
            assert refused.status == 503
            assert b"max_requests" in refused.body
            release.set()
            assert (await asyncio.wait_for(read_response(reader), 5)).body == b"late"
        assert router.stats.upstream_overflows.get(("up", "max_requests")) == 1
        assert router.clusters["up"].overflows == 1
        assert_idle(router)


async def test_max_connections_queues_then_overflows_max_pending() -> None:
    async with (
        stalled_upstream() as (address, arrived, release),
        running_router(one_cluster(address, limits={"max_connections": 1, "max_pending": 1})) as router,
    ):
        port = router.address_of("web")[1]
        cluster = router.clusters["up"]
        async with raw_client(port) as (r1, w1), raw_client(port) as (r2, w2):
            w1.write(GET)
            await asyncio.wait_for(arrived.wait(), 5)
            w2.write(GET)  # needs a connection; the only one is busy: waits
            await until(lambda: cluster.pending == 1)
            refused = await exchange(port, GET)  # pending is full too
            assert refused.status == 503
            assert b"max_connections and max_pending" in refused.body
            release.set()
            assert (await asyncio.wait_for(read_response(r1), 5)).body == b"late"
            # the waiting request gets the released connection
            assert (await asyncio.wait_for(read_response(r2), 5)).body == b"late"
        assert router.stats.upstream_overflows.get(("up", "max_pending")) == 1
        assert router.stats.upstream_connections.get(("up",)) == 1
        assert cluster.connections == 1
        assert_idle(router)


async def test_client_leaving_mid_request_releases_the_upstream() -> None:
    upstream_closed = asyncio.Event()
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()  # until the proxy closes its side
        upstream_closed.set()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        async with raw_client(port) as (_, writer):
            # headers and part of a body, then the client goes away
            writer.write(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nabc")
            await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.wait_for(upstream_closed.wait(), 5)
        cluster = router.clusters["up"]
        await until(lambda: cluster.connections == 0)
        assert not cluster.endpoints[0].idle
        assert_idle(router)


async def test_outlier_ejection_follows_5xx_and_success_resets() -> None:
    async with http_upstream(status_app(500, "bad")) as bad, http_upstream(status_app(200, "good")) as good:
        config = http_config(
            {"up": {"endpoints": endpoints(bad, good), "outlier": {"consecutive_failures": 2, "base_ejection": "30s"}}},
            [{"match": {"path_prefix": "/"}, "to": "up"}],
        )
        async with running_router(config) as router:
            port = router.address_of("web")[1]
            statuses = [(await exchange(port, GET)).status for _ in range(8)]
            cluster = router.clusters["up"]
            bad_endpoint, good_endpoint = cluster.endpoints
            assert bad_endpoint.ejected and not good_endpoint.ejected
            assert statuses.count(500) == 2  # ejected after its second 500
            assert good_endpoint.consecutive_failures == 0


async def test_connect_timeout_is_503() -> None:
    # A listening socket whose accept queue is full: further SYNs are dropped, so a connect
    # hangs until it times out.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()[:2]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        async with running_router(one_cluster(address, connect_timeout="300ms")) as router:
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await exchange(router.address_of("web")[1], GET)
            assert response.status == 503 and response.body == b"upstream connect error\n"
            assert 0.25 < loop.time() - started < 3
            assert router.stats.upstream_connect_failures.get(("up",)) == 1
            assert router.clusters["up"].connections == 0
            assert_idle(router)
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_reset_mid_response_cuts_the_client_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst part")
        await writer.drain()
        await asyncio.sleep(0.05)  # a separate read at the proxy, after the head was relayed
        writer.transport.abort()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            writer.write(GET)
            raw = await asyncio.wait_for(read_until_closed(reader), 5)
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"first part")
        assert router.clusters["up"].endpoints[0].consecutive_failures == 1
        assert_idle(router)
