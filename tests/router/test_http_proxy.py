"""The HTTP/1.1 proxy against real upstreams and real clients: routing, headers, framing,
keep-alive pools, pipelining, Expect, Upgrade, metrics, reload and drain."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from pointsman.config import parse_config
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

PEERS = web.AppKey("peers", set[Any])
ARRIVED = web.AppKey("arrived", asyncio.Event)  # set when a /delay/ request reaches the app


def echo_app(name: str = "up") -> web.Application:
    """Answers with JSON describing the request it got, and a few special paths."""
    app = web.Application()
    app[PEERS] = set()
    app[ARRIVED] = asyncio.Event()

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        app[PEERS].add(peer)
        if request.path.startswith("/delay/"):
            app[ARRIVED].set()
            await asyncio.sleep(int(request.path.rsplit("/", 1)[1]) / 1000)
        if request.path == "/status/204":
            return web.Response(status=204)
        if request.path == "/status/304":
            return web.Response(status=304, headers={"ETag": '"x"'})
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"alpha-", b"beta-", b"gamma"):
                await response.write(part)
            await response.write_eof()
            return response
        info = {
            "name": name,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
        }
        return web.json_response(info)

    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def proxied(app: web.Application, **cluster: Any) -> AsyncIterator[tuple[Router, str]]:
    """An upstream running ``app`` and a router in front of it; yields (router, base url)."""
    async with http_upstream(app) as address, running_router(one_cluster(address, **cluster)) as router:
        host, port = router.address_of("web")
        yield router, f"http://{host}:{port}"


def _headers(info: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


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
            assert stats.get(("web", "shop", "a", "2xx")) == 1
            assert stats.get(("web", "api", "b", "2xx")) == 1
            assert stats.get(("web", "canary", "c", "2xx")) == 1
            assert stats.get(("web", "", "", "4xx")) == 1
            assert router.stats.http_duration.count(("web", "api")) == 1
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


async def test_chunked_request_and_response_are_forwarded_chunked() -> None:
    seen: list[tuple[str, list[tuple[str, str]], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
            )

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(
                b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Client-Trailer: 1\r\n\r\n"
            )
            response = await read_response(reader)
            assert response.status == 200
            assert response.header("transfer-encoding") == "chunked"
            assert response.body == b"hello, world"
            # Content-Length framing, on the same connection
            writer.write(b"PUT /cl HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n12345")
            response = await read_response(reader)
            assert response.body == b"hello, world"
        first, second = seen
        assert first[0] == "POST /up HTTP/1.1"
        assert ("Transfer-Encoding", "chunked") in first[1]
        assert first[2] == b"abcdefg"
        assert all(k.lower() != "x-client-trailer" for k, _ in first[1])
        assert ("Content-Length", "5") in second[1]
        assert second[2] == b"12345"


async def test_close_delimited_response_is_rechunked_or_closed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the ")
        await writer.drain()
        writer.write(b"end")
        await writer.drain()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            response = await read_response(reader)
            assert response.header("transfer-encoding") == "chunked"
            assert response.body == b"until the end"
            # the client connection stays usable
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_response(reader)).body == b"until the end"

        async with raw_client(port) as (reader, writer):
            writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            raw = await asyncio.wait_for(read_until_closed(reader), 5)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"transfer-encoding" not in head.lower()
            assert b"connection: close" in head.lower()
            assert body == b"until the end"


async def test_http10_client_and_connection_close() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"GET /a HTTP/1.0\r\n\r\n")
            raw = await asyncio.wait_for(read_until_closed(reader), 5)
            assert raw.startswith(b"HTTP/1.1 200")
            assert b'"path": "/a"' in raw

        async with raw_client(port) as (reader, writer):
            writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = await read_response(reader)
            assert response.header("connection") == "keep-alive"
            writer.write(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert json.loads((await read_response(reader)).body)["path"] == "/b"

        async with raw_client(port) as (reader, writer):
            # llhttp reads Proxy-Connection as Connection: its keep-alive answer alone does not
            # tell HTTP/1.0 from HTTP/1.1 here.
            writer.write(b"GET /c HTTP/1.0\r\nHost: h\r\nProxy-Connection: keep-alive\r\n\r\n")
            response = await read_response(reader)
            assert response.header("connection") == "keep-alive"
            assert json.loads(response.body)["path"] == "/c"

        async with raw_client(port) as (reader, writer):
            writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            response = await read_response(reader)
            assert response.status == 200
            assert response.header("connection") == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            # the first is the slowest: answers must still come in request order
            paths = ["/delay/150", "/delay/50", "/delay/0", "/x", "/status/204", "/y"]
            writer.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for p in paths))
            got: list[object] = []
            for _ in paths:
                response = await asyncio.wait_for(read_response(reader), 5)
                got.append(json.loads(response.body)["path"] if response.status == 200 else response.status)
            assert got == ["/delay/150", "/delay/50", "/delay/0", "/x", 204, "/y"]


async def test_head_204_and_304_have_no_body() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader, head_request=True), 5)
            assert response.status == 200
            assert int(response.header("content-length") or 0) > 0  # what a GET would carry
            # A stray body would be read as the next response's head, failing this:
            for path in ("/status/204", "/status/304", "/after"):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
                response = await asyncio.wait_for(read_response(reader), 5)
                assert response.body == b"" or json.loads(response.body)["path"] == "/after"
            writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\nGET /last HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_response(reader, head_request=True)).status == 200
            assert json.loads((await read_response(reader)).body)["path"] == "/last"
        assert router.stats.http_requests.get(("web", "all", "up", "3xx")) == 1


async def test_chunked_upstream_response_through_aiohttp_client() -> None:
    async with (
        proxied(echo_app()) as (_, base),
        aiohttp.ClientSession() as session,
        session.get(base + "/chunked") as response,
    ):
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert await response.read() == b"alpha-beta-gamma"


async def test_expect_100_continue_answered_by_the_proxy() -> None:
    seen: list[list[tuple[str, str]]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, headers, body = await read_request(reader)
            seen.append(headers)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(body))), len(body)))

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            response = await read_response(reader)
            assert response.status == 200 and response.body == b"5"
        assert all(k.lower() != "expect" for k, _ in seen[0])

        # curl waits for the 100 before sending its body
        with tempfile.NamedTemporaryFile() as upload:
            upload.write(os.urandom(300_000))
            upload.flush()
            process = await asyncio.create_subprocess_exec(
                "curl",
                "-sv",
                "--expect100-timeout",
                "30",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                f"@{upload.name}",
                f"http://127.0.0.1:{port}/curl",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err
        assert out == b"300000"
        assert b"HTTP/1.1 100 Continue" in err


async def test_expect_100_continue_not_sent_when_not_routed() -> None:
    async with proxied(echo_app(), route={"match": {"path_prefix": "/only"}}) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 5)
            assert response.status == 404  # the final answer, with no 100 before it
            assert response.raw_head.startswith(b"HTTP/1.1 404")


async def test_websocket_upgrade_is_tunnelled() -> None:
    app = web.Application()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app.router.add_get("/ws", ws_handler)
    async with proxied(app) as (router, base), aiohttp.ClientSession() as session:
        async with session.ws_connect(base + "/ws") as ws:
            for i in range(5):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo:m{i}"
            blob = os.urandom(300_000)
            await ws.send_bytes(blob)
            assert (await ws.receive_bytes()) == blob[::-1]
        assert router.stats.http_requests.get(("web", "all", "up", "1xx")) == 1
        # the tunnel's end releases the request and closes its upstream connection
        cluster = router.clusters["up"]
        await until(lambda: cluster.requests == 0 and cluster.connections == 0)
        assert cluster.endpoints[0].active == 0


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


async def test_pipelined_requests_with_bodies() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            writer.write(
                b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n"
                b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
                b"PUT /d HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000
            )
            got = []
            for _ in range(4):
                info = json.loads((await asyncio.wait_for(read_response(reader), 5)).body)
                got.append((info["path"], info["body_len"]))
            assert got == [("/a", 3), ("/b", 4), ("/c", 0), ("/d", 100_000)]
        assert len(router.clusters["up"].endpoints[0].idle) == 1


async def test_response_body_in_many_reads_then_connection_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
            for piece in (b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"):
                await writer.drain()
                await asyncio.sleep(0.01)  # separate reads at the proxy
                writer.write(piece)

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            for _ in range(3):
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                response = await asyncio.wait_for(read_response(reader), 5)
                assert response.body == b"0123456789abcdefghijABCDEFGHIJ"
        assert connections == 1


async def test_reused_upstream_connection_starts_each_response_afresh() -> None:
    # What one response set on the upstream connection (chunked framing, names listed in
    # Connection, Connection: close is not sent) must not carry over to the next one on it.
    connections = 0
    responses = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Hop: 2\r\n\r\ncd",
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for n in range(4):
            await read_request(reader)
            writer.write(responses[n % 2])

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            for _ in range(2):
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                first = await asyncio.wait_for(read_response(reader), 5)
                assert first.body == b"ab" and first.header("transfer-encoding") == "chunked"
                assert first.header("x-hop") is None
                writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                second = await asyncio.wait_for(read_response(reader), 5)
                assert second.body == b"cd" and second.header("content-length") == "2"
                assert second.header("transfer-encoding") is None and second.header("x-hop") == "2"
                assert second.header("connection") is None
        assert connections == 1


async def test_interim_responses_from_the_upstream_are_not_relayed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )

    async with (
        raw_upstream(handler) as address,
        running_router(one_cluster(address)) as router,
        raw_client(router.address_of("web")[1]) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert raw_head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert await reader.readexactly(2) == b"ok"


async def test_refused_upgrade_is_answered_and_the_connection_closed() -> None:
    async with proxied(echo_app()) as (router, _), raw_client(router.address_of("web")[1]) as (reader, writer):
        writer.write(b"GET /plain HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 200
        assert response.header("connection") == "close"
        info = json.loads(response.body)
        assert ["Upgrade", "websocket"] in info["headers"]
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_absolute_form_target_and_http10_without_host() -> None:
    seen: list[tuple[str, list[tuple[str, str]], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    config = http_config(
        {"up": {"endpoints": ["127.0.0.1:1"]}},  # replaced below
        [{"match": {"host": "api.test", "path": "/v1"}, "to": "up"}, {"match": {"path_prefix": "/"}, "to": "up"}],
    )
    async with raw_upstream(handler) as address:
        config["clusters"]["up"]["endpoints"] = [f"{address[0]}:{address[1]}"]
        async with running_router(config) as router:
            port = router.address_of("web")[1]
            response = await exchange(port, b"GET http://API.test:8080/v1?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
            assert response.status == 200
            response = await exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
            assert response.status == 200
            assert router.stats.http_requests.get(("web", "0", "up", "2xx")) == 1
    (line1, headers1, _), (line2, headers2, _) = seen
    assert line1 == "GET /v1?x=1 HTTP/1.1"
    assert dict(headers1)["X-Forwarded-Host"] == "API.test:8080"
    assert line2 == "GET /old HTTP/1.1"
    assert dict(headers2)["Host"] == f"{address[0]}:{address[1]}"  # HTTP/1.1 needs one


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
        assert router.stats.http_requests.get(("web", "all", "up", "5xx")) == 1
