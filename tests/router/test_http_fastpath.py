"""What the per-connection shortcuts of the HTTP proxy must not change: a done request renewed
for the connection's next one, the route cache and the upstream head cache. Each test sends
requests that differ in one thing on one keep-alive connection, after one that took the fast
path, and checks that the difference reaches the upstream (or the client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.router.test_http_helpers import (
    Response,
    echo_app,
    http_config,
    proxied,
    raw_client,
    read_response,
)
from tests.support import http_upstream, running_router


def echoed(response: Response) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(response.body)
    info["headers"] = {k.lower(): v for k, v in info["headers"]}
    return info


async def send(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes, **kw: Any) -> Response:
    writer.write(data)
    return await asyncio.wait_for(read_response(reader, **kw), 5)


async def test_a_renewed_request_keeps_nothing_of_the_last_one() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            first = echoed(await send(writer, reader, b"GET /a?x=1 HTTP/1.1\r\nHost: first\r\n\r\n"))
            assert first["headers"]["host"] == "first" and first["query"] == "x=1"
            # HTTP/1.0 without Host: the endpoint's address is the Host, not the last one's.
            second = echoed(
                await send(writer, reader, b"POST /b HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
            )
            assert second["method"] == "POST" and second["body_len"] == 2
            assert second["headers"]["host"] != "first"
            third = echoed(await send(writer, reader, b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n"))
            assert third["method"] == "GET" and third["path"] == "/d" and third["body_len"] == 0
            # After a HEAD, a refused request's answer still has its body.
            head = await send(writer, reader, b"HEAD /c HTTP/1.1\r\nHost: h\r\n\r\n", head_request=True)
            assert head.status == 200 and head.body == b""
            refused = await send(writer, reader, b"GET /e HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
            assert refused.status == 431 and refused.body == b"request header too large\n"
        cluster = router.clusters["up"]
        assert cluster.requests == 0 and cluster.endpoints[0].active == 0


async def test_upstream_head_cache_sees_every_difference() -> None:
    async with proxied(echo_app()) as (router, _):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):
            plain = b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
            for _ in range(2):
                info = echoed(await send(writer, reader, plain))
                assert info["headers"]["x-a"] == "1" and info["headers"]["x-forwarded-host"] == "h"
            info = echoed(await send(writer, reader, b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 2\r\n\r\n"))
            assert info["headers"]["x-a"] == "2"
            info = echoed(
                await send(writer, reader, b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 2\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
            )
            assert info["headers"]["x-forwarded-for"].startswith("10.0.0.1, ")
            info = echoed(await send(writer, reader, b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 2\r\n\r\n"))
            assert info["headers"]["x-forwarded-for"] == "127.0.0.1"
            # absolute-form: the same origin-form target and Host field, another authority
            for authority in ("one.example", "two.example"):
                request = b"GET http://%s/p HTTP/1.1\r\nHost: h\r\nX-A: 2\r\n\r\n" % authority.encode()
                info = echoed(await send(writer, reader, request))
                assert info["path"] == "/p" and info["headers"]["x-forwarded-host"] == authority


async def test_route_cache_follows_host_path_and_method() -> None:
    async with (
        http_upstream(echo_app("a")) as a,
        http_upstream(echo_app("b")) as b,
        running_router(
            http_config(
                {"a": {"endpoints": [f"{a[0]}:{a[1]}"]}, "b": {"endpoints": [f"{b[0]}:{b[1]}"]}},
                [
                    {"name": "b-host", "match": {"host": "b.example", "path_prefix": "/"}, "to": "b"},
                    {"name": "b-post", "match": {"path_prefix": "/api", "methods": ["POST"]}, "to": "b"},
                    {"name": "rest", "match": {"path_prefix": "/"}, "to": "a"},
                ],
            )
        ) as router,
    ):
        port = router.address_of("web")[1]
        async with raw_client(port) as (reader, writer):

            async def name_of(request: bytes) -> str:
                return str(echoed(await send(writer, reader, request))["name"])

            assert await name_of(b"GET /api?x=1 HTTP/1.1\r\nHost: a.example\r\n\r\n") == "a"
            assert await name_of(b"GET /api?x=2 HTTP/1.1\r\nHost: a.example\r\n\r\n") == "a"
            assert await name_of(b"GET /api?x=2 HTTP/1.1\r\nHost: B.example:80\r\n\r\n") == "b"
            assert await name_of(b"GET /api?x=2 HTTP/1.1\r\nHost: a.example\r\n\r\n") == "a"
            assert await name_of(b"POST /api?x=2 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n") == "b"
            assert await name_of(b"GET /api/more HTTP/1.1\r\nHost: a.example\r\n\r\n") == "a"
            assert await name_of(b"GET /api/more HTTP/1.1\r\nHost: b.example\r\n\r\n") == "b"
