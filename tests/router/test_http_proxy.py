"""The HTTP/1.1 proxy against real upstreams and real clients: routing, forwarded and hop-by-hop
headers, keep-alive pools, balancing, reload, drain and abort."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from pointsman.config import parse_config
from tests.router.test_http_helpers import (
    ARRIVED,
    PEERS,
    echo_app,
    exchange,
    http_config,
    one_cluster,
    proxied,
    raw_client,
    raw_upstream,
    read_request,
    read_response,
    read_until_closed,
    until,
)
from tests.support import http_upstream, running_router


async def test_routes_by_host_path_and_headers_and_404() -> None:
    async with (
        http_upstream(echo_app("a")) as a,
        http_upstream(echo_app("b")) as b,
        http_upstream(echo_app("c")) as c,
    ):
        config = http_config(
            {
                "a": {"endpoints": [f"{a[0]}:{a[1]}"]},
                "b": {"endpoints": [f"{b[0]}:{b[1]}"]},
                "c": {"endpoints": [f"{c[0]}:{c[1]}"]},
            },
            [
                {"name": "canary", "match": {"path_prefix": "/api", "headers": {"x-canary": "1"}}, "to": "c"},
                {"name": "shop", "match": {"host": "*.shop.test"}, "to": "a"},
                {"name": "api", "match": {"path_prefix": "/api"}, "to": "b"},
            ],
        )
        async with running_router(config) as router, aiohttp.ClientSession() as session:
            host, port = router.address_of("web")
            base = f"http://{host}:{port}"

            async def name_of(path: str, **headers: str) -> str:
                async with session.get(base + path, headers=headers) as response:
                    assert response.status == 200
                    return str((await response.json())["name"])

            assert await name_of("/x?q=1", Host="www.Shop.test:8080") == "a"
            assert await name_of("/api/v1?x=/y") == "b"
            assert await name_of("/api/v1", **{"X-Canary": "1"}) == "c"
            # the query string is not part of the path that is matched
            async with session.get(base + "/nothing?p=/api") as response:
                assert response.status == 404
                assert "no route" in await response.text()
            stats = router.stats.http_requests
            assert stats.get(("web", "", "", "", "", "shop", "a", "2xx")) == 1
            assert stats.get(("web", "", "", "", "", "api", "b", "2xx")) == 1
            assert stats.get(("web", "", "", "", "", "canary", "c", "2xx")) == 1
            assert stats.get(("web", "", "", "", "", "", "", "4xx")) == 1
            assert router.stats.http_duration.count(("web", "", "", "", "", "api")) == 1
            assert router.stats.downstream_connections.get(("web",)) >= 1


async def test_request_target_and_body_forwarded() -> None:
    async with proxied(echo_app()) as (_, base), aiohttp.ClientSession() as session:
        async with session.post(base + "/p/a%20th?a=1&b=2", data=b"x" * 100_000) as response:
            info = await response.json()
        assert info["method"] == "POST"
        assert info["path"] == "/p/a th"
        assert info["query"] == "a=1&b=2"
        assert info["body_len"] == 100_000


async def test_forwarded_headers_added_and_hop_by_hop_removed_both_ways() -> None:
    seen: list[list[tuple[str, str]]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request(reader)
        seen.append(headers)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Secret\r\n"
            b"Keep-Alive: timeout=5\r\nX-Secret: s\r\nX-End: e\r\nVia: 1.0 origin\r\n\r\nok"
        )
        await reader.read()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        response = await exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: orig.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
            b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nVia: 1.0 edge\r\nX-Keep: k\r\n\r\n",
        )
        assert response.status == 200 and response.body == b"ok"
        assert response.header("x-end") == "e"
        for hop in ("connection", "keep-alive", "x-secret"):
            assert response.header(hop) is None, hop
        assert response.all("via") == ["1.0 origin", "1.1 pointsman"]

        got = {k.lower(): v for k, v in seen[0]}
        for hop in ("connection", "x-hop", "keep-alive", "proxy-connection", "te", "trailer"):
            assert hop not in got, hop
        assert got["x-keep"] == "k"
        assert got["host"] == "orig.test"
        assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert got["x-forwarded-proto"] == "http"
        assert got["x-forwarded-host"] == "orig.test"
        assert got["via"] == "1.0 edge, 1.1 pointsman"

    # xff: false leaves X-Forwarded-* and Via alone
    seen.clear()
    async with raw_upstream(handler) as address, running_router(one_cluster(address, http={"xff": False})) as router:
        port = router.address_of("web")[1]
        response = await exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nKeep-Alive: 300\r\n"
            b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\r\n",
        )
        assert response.status == 200
        got = {k.lower(): v for k, v in seen[0]}
        assert got["x-forwarded-for"] == "1.2.3.4"
        # Hop-by-hop fields are removed whatever the xff setting.
        for hop in ("keep-alive", "proxy-connection", "te", "trailer"):
            assert hop not in got, hop
        assert "via" not in got and "x-forwarded-proto" not in got
        assert response.all("via") == ["1.0 origin"]


async def test_keep_alive_pool_reuses_one_upstream_connection() -> None:
    app = echo_app()
    async with proxied(app) as (router, base), aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(base + "/") as response:
                assert response.status == 200
                await response.read()
        assert len(app[PEERS]) == 1
        endpoint = router.clusters["up"].endpoints[0]
        assert len(endpoint.idle) == 1
        assert endpoint.connections == 1 and endpoint.active == 0
        assert router.clusters["up"].connections == 1 and router.clusters["up"].requests == 0
        assert router.stats.upstream_connections.get(("up",)) == 1


async def test_idle_upstream_connection_closed_after_idle_timeout() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert await reader.read() == b""  # the proxy closes the idle connection
        closed.set()

    async with raw_upstream(handler) as address, running_router(one_cluster(address, idle_timeout="200ms")) as router:
        response = await exchange(router.address_of("web")[1], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.status == 200
        endpoint = router.clusters["up"].endpoints[0]
        assert len(endpoint.idle) == 1
        await asyncio.wait_for(closed.wait(), 5)
        assert not endpoint.idle


async def test_upstream_closing_a_pooled_connection_is_noticed() -> None:
    connections = 0
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        # Announces keep-alive, then closes anyway (as a server's own idle timeout would).
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        closed.set()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_response(reader)).status == 200
            await closed.wait()
            endpoint = router.clusters["up"].endpoints[0]
            # The close arrives as connection_lost, which takes the connection out of the pool.
            await until(lambda: not endpoint.idle)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_response(reader)).status == 200
        assert connections == 2


async def test_stopped_cluster_closes_connections_instead_of_pooling() -> None:
    app = echo_app()
    async with proxied(app) as (router, base), aiohttp.ClientSession() as session:
        router.clusters["up"].stopped = True
        async with session.get(base + "/") as response:
            assert response.status == 200
        assert not router.clusters["up"].endpoints[0].idle


async def test_reload_swaps_the_table_between_requests_of_one_connection() -> None:
    async with http_upstream(echo_app("a")) as a, http_upstream(echo_app("b")) as b:

        def config(target: str) -> dict[str, Any]:
            return http_config(
                {"a": {"endpoints": [f"{a[0]}:{a[1]}"]}, "b": {"endpoints": [f"{b[0]}:{b[1]}"]}},
                [{"match": {"path_prefix": "/"}, "to": target}],
            )

        async with running_router(config("a")) as router:
            port = router.address_of("web")[1]
            async with raw_client(port) as (reader, writer):
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert json.loads((await read_response(reader)).body)["name"] == "a"
                parsed = parse_config(config("b"))
                await router.apply(parsed.clusters, parsed.listeners)
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert json.loads((await read_response(reader)).body)["name"] == "b"


async def test_hash_balancer_keeps_a_header_on_one_endpoint() -> None:
    async with (
        http_upstream(echo_app("a")) as a,
        http_upstream(echo_app("b")) as b,
        http_upstream(echo_app("c")) as c,
    ):
        endpoints = [f"{h}:{p}" for h, p in (a, b, c)]
        for hash_on, send in (({"header": "X-User"}, "header"), ({"cookie": "uid"}, "cookie")):
            config = http_config(
                {"up": {"endpoints": endpoints, "balancer": "hash", "hash_on": hash_on}},
                [{"match": {"path_prefix": "/"}, "to": "up"}],
            )
            async with running_router(config) as router, aiohttp.ClientSession() as session:
                base = "http://{}:{}".format(*router.address_of("web"))
                owners: dict[str, set[str]] = {}
                for user in [f"user{i}" for i in range(12)] * 3:
                    headers = {"X-User": user} if send == "header" else {"Cookie": f"a=1; uid={user}; z=2"}
                    async with session.get(base + "/", headers=headers) as response:
                        owners.setdefault(user, set()).add((await response.json())["name"])
                assert all(len(names) == 1 for names in owners.values())
                assert len(set().union(*owners.values())) > 1


async def test_drain_closes_idle_connections_and_finishes_in_flight_ones() -> None:
    app = echo_app()
    async with proxied(app) as (router, _):
        port = router.address_of("web")[1]
        handle = router.listeners["web"]
        async with raw_client(port) as (idle_reader, idle_writer), raw_client(port) as (reader, writer):
            idle_writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_response(idle_reader)).status == 200
            writer.write(b"GET /delay/300 HTTP/1.1\r\nHost: h\r\n\r\n")
            await asyncio.wait_for(app[ARRIVED].wait(), 5)  # the slow request is in flight
            for conn in list(handle.connections):
                conn.begin_drain()
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            response = await asyncio.wait_for(read_response(reader), 5)
            assert response.status == 200
            assert response.header("connection") == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(handle.idle_event.wait(), 5)


async def test_abort_closes_at_once() -> None:
    arrived = asyncio.Event()
    upstream_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()  # never answers; returns when the proxy drops the connection
        upstream_closed.set()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await asyncio.wait_for(arrived.wait(), 5)
            for conn in list(router.listeners["web"].connections):
                conn.abort()
            assert await asyncio.wait_for(read_until_closed(reader), 5) == b""
        await asyncio.wait_for(upstream_closed.wait(), 5)  # the request in flight is dropped
        cluster = router.clusters["up"]
        assert cluster.requests == 0 and cluster.endpoints[0].active == 0


async def test_no_available_endpoint_is_503() -> None:
    async with proxied(echo_app()) as (router, base), aiohttp.ClientSession() as session:
        cluster = router.clusters["up"]
        cluster.set_healthy(cluster.endpoints[0], False)
        async with session.get(base + "/") as response:
            assert response.status == 503
            assert await response.text() == "no healthy upstream\n"
        cluster.set_healthy(cluster.endpoints[0], True)
        async with session.get(base + "/") as response:
            assert response.status == 200
        assert router.stats.http_requests.get(("web", "", "", "", "", "all", "up", "5xx")) == 1


async def test_routes_by_the_clients_identity() -> None:
    """`match: {apps, versions}` routes by who the client is (here a listener's fixed
    identity, as a sidecar's; the placement table's instance in tests/pointsman/test_sidecars.py),
    and the identity labels the request series."""
    async with http_upstream(echo_app("a")) as a, http_upstream(echo_app("b")) as b:
        clusters = {"a": {"endpoints": [f"{a[0]}:{a[1]}"]}, "b": {"endpoints": [f"{b[0]}:{b[1]}"]}}
        routes = [
            {"name": "canary", "match": {"apps": ["web*"], "versions": ["v2*"]}, "to": "b"},
            {"name": "all", "to": "a"},
        ]
        config = http_config(clusters, routes)
        config["listeners"] = [
            {**config["listeners"][0], "name": name, "identity": identity}
            for name, identity in (
                ("canary", {"app": "web-frontend", "version": "v2.1", "instance": "web-3", "node": "n2"}),
                ("stable", {"app": "web-frontend", "version": "v1", "instance": "web-1", "node": "n1"}),
                ("other", {"app": "billing", "version": "v2"}),
            )
        ]
        async with running_router(config) as router, aiohttp.ClientSession() as session:
            served = {}
            for listener in ("canary", "stable", "other"):
                host, port = router.address_of(listener)
                for _ in range(2):  # the second request takes the connection's route cache
                    async with session.get(f"http://{host}:{port}/x") as response:
                        assert response.status == 200
                        served.setdefault(listener, set()).add((await response.json())["name"])
            assert served == {"canary": {"b"}, "stable": {"a"}, "other": {"a"}}
            requests = router.stats.http_requests
            assert requests.get(("canary", "web-frontend", "v2.1", "web-3", "n2", "canary", "b", "2xx")) == 2
            assert requests.get(("other", "billing", "v2", "", "", "all", "a", "2xx")) == 2
