"""Requests the proxy refuses: each is answered, counted by reason and its connection closed,
while other clients keep being served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from router.listeners import Router
from tests.router.test_http_helpers import (
    exchange,
    one_cluster,
    raw_client,
    read_response,
    read_until_closed,
)
from tests.support import http_upstream, running_router

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@asynccontextmanager
async def counting_router(**http: object) -> AsyncIterator[tuple[Router, int, list[str]]]:
    """A router before an upstream that records every request it gets."""
    seen: list[str] = []
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        await request.read()
        return web.Response(text="ok")

    app.router.add_route("*", "/{tail:.*}", handler)
    async with http_upstream(app) as address, running_router(one_cluster(address, http=http or None)) as router:
        yield router, router.address_of("web")[1], seen


async def refused(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the proxy closes the connection."""
    async with raw_client(port) as (reader, writer):
        writer.write(data)
        return await asyncio.wait_for(read_until_closed(reader), 5)


async def test_malformed_requests_are_400_and_others_are_still_served() -> None:
    async with counting_router() as (router, port, seen):
        bad = [
            b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n",  # control character in the target
            b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
        ]
        refusals = asyncio.gather(*(refused(port, data) for data in bad))
        answers = asyncio.gather(*(exchange(port, GET) for _ in range(3)))
        raws, goods = await asyncio.gather(refusals, answers)
        for raw in raws:
            assert raw.startswith(b"HTTP/1.1 400 "), raw
            assert b"Connection: close" in raw
        assert [r.status for r in goods] == [200] * 3
        assert router.stats.http_rejected.get(("web", "malformed")) == len(bad)
        assert seen == ["/"] * 3
        # the bad chunk is found after routing, so that one is counted under its route
        counted = router.stats.http_requests.values
        assert sum(v for k, v in counted.items() if k[-1] == "4xx") == len(bad)


async def test_content_length_with_transfer_encoding_is_refused_not_forwarded() -> None:
    async with counting_router() as (router, port, seen):
        smuggle = (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        raw = await refused(port, smuggle)
        assert raw.startswith(b"HTTP/1.1 400 ")
        raw = await refused(port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert router.stats.http_rejected.get(("web", "ambiguous_length")) == 2
        assert seen == []


async def test_unsupported_transfer_coding_is_501() -> None:
    async with counting_router() as (_, port, seen):
        raw = await refused(
            port, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 501 ")
        assert seen == []


async def test_oversized_header_is_431() -> None:
    async with counting_router(max_header_bytes=2048) as (router, port, seen):
        # in one piece
        raw = await refused(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 431 ")
        # many small headers, trickled in: never complete, so only the byte count can stop it
        async with raw_client(port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
            for i in range(200):
                if reader.at_eof() or writer.transport.is_closing():
                    break
                writer.write(b"X-H%d: %s\r\n" % (i, b"v" * 20))
                await writer.drain()
            raw = await asyncio.wait_for(read_until_closed(reader), 5)
            assert raw.startswith(b"HTTP/1.1 431 ")
        # a long request line
        raw = await refused(port, b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 431 ")
        assert router.stats.http_rejected.get(("web", "header_too_large")) == 3
        # just under the limit is fine
        response = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Fits: " + b"a" * 1800 + b"\r\n\r\n")
        assert response.status == 200
        assert seen == ["/"]


async def test_slow_headers_get_408_while_others_are_served() -> None:
    async with counting_router(header_timeout="300ms") as (router, port, _):
        loop = asyncio.get_running_loop()

        async def slowloris() -> tuple[bytes, float]:
            async with raw_client(port) as (reader, writer):
                started = loop.time()

                async def trickle() -> None:
                    writer.write(b"GET / HTTP/1.1\r\n")
                    for i in range(100):  # a header line every 50ms, never the blank line
                        await asyncio.sleep(0.05)  # the client's pace, not a wait for the proxy
                        writer.write(b"X-%d: 1\r\n" % i)

                sender = asyncio.create_task(trickle())
                raw = await asyncio.wait_for(read_until_closed(reader), 5)
                elapsed = loop.time() - started
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                return raw, elapsed

        async def steady() -> list[int]:
            statuses = []
            for _ in range(5):
                statuses.append((await exchange(port, GET)).status)
                await asyncio.sleep(0.05)
            return statuses

        (raw, elapsed), statuses = await asyncio.gather(slowloris(), steady())
        assert raw.startswith(b"HTTP/1.1 408 ")
        assert elapsed < 2.0
        assert statuses == [200] * 5
        assert router.stats.http_rejected.get(("web", "header_timeout")) == 1

        # a connection that sends nothing at all is also closed after header_timeout
        raw = await refused(port, b"")
        assert raw.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with counting_router(idle_timeout="200ms") as (router, port, _):
        async with raw_client(port) as (reader, writer):
            writer.write(GET)
            assert (await read_response(reader)).status == 200
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no response
        assert router.stats.http_rejected.get(("web", "header_timeout")) == 0


async def test_connect_method_is_refused() -> None:
    async with counting_router() as (_, port, seen):
        raw = await refused(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 405 ")
        assert seen == []
