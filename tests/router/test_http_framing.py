"""HTTP/1.1 framing through the proxy against real upstreams and clients: chunked and
close-delimited bodies, HTTP/1.0, pipelining, HEAD/204/304, interim responses, Expect:
100-continue, Upgrade tunnels and absolute-form targets."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

import aiohttp
from aiohttp import web

from tests.router.test_http_helpers import (
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
from tests.support import running_router


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
        assert router.stats.http_requests.get(("web", "", "", "", "", "all", "up", "3xx")) == 1


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
        assert router.stats.http_requests.get(("web", "", "", "", "", "all", "up", "1xx")) == 1
        # the tunnel's end releases the request and closes its upstream connection
        cluster = router.clusters["up"]
        await until(lambda: cluster.requests == 0 and cluster.connections == 0)
        assert cluster.endpoints[0].active == 0


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
            assert router.stats.http_requests.get(("web", "", "", "", "", "0", "up", "2xx")) == 1
    (line1, headers1, _), (line2, headers2, _) = seen
    assert line1 == "GET /v1?x=1 HTTP/1.1"
    assert dict(headers1)["X-Forwarded-Host"] == "API.test:8080"
    assert line2 == "GET /old HTTP/1.1"
    assert dict(headers2)["Host"] == f"{address[0]}:{address[1]}"  # HTTP/1.1 needs one
