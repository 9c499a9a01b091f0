"""``GET /http/stats``'s arithmetic (:class:`router.http_stats.HttpStats`) on the counters a
real Router keeps while it proxies real requests to an aiohttp upstream.

The samples are taken with explicit clock readings, so rates are exact: N requests between
the samples at t=0 and t=2 are N/2 per second, however long the requests took."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from aiohttp import web

from router.http_stats import HttpStats
from router.listeners import Router
from router.metrics import RouterStats
from tests.router.test_http_helpers import http_config
from tests.support import http_upstream, running_router, wait_until


def upstream_app(release: asyncio.Event) -> web.Application:
    """/ok: 200; /fail: 500; /sleep/MS: 200 after MS milliseconds; /hold: 200 once
    ``release`` is set."""
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text="slept")

    async def hold(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="released")

    app.router.add_get("/api/ok", ok)
    app.router.add_get("/api/fail", fail)
    app.router.add_get("/slow/sleep/{ms}", sleep)
    app.router.add_get("/hold", hold)
    return app


def refused_port() -> socket.socket:
    """Bound but not listening: a connection to it is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def config(up: tuple[str, int], dead_port: int) -> dict[str, Any]:
    return http_config(
        {
            "up": {"endpoints": [f"{up[0]}:{up[1]}"]},
            "held": {"endpoints": [f"{up[0]}:{up[1]}"], "limits": {"max_requests": 1}},
            "dead": {"endpoints": [f"127.0.0.1:{dead_port}"]},
        },
        [
            {"name": "api", "match": {"path_prefix": "/api/"}, "to": "up"},
            {"name": "slow", "match": {"path_prefix": "/slow/"}, "to": "up"},
            {"name": "hold", "match": {"path_prefix": "/hold"}, "to": "held"},
            {"name": "dead", "match": {"path_prefix": "/dead"}, "to": "dead"},
        ],
    )


async def get(session: aiohttp.ClientSession, base: str, path: str, n: int = 1) -> list[int]:
    statuses = []
    for _ in range(n):
        async with session.get(base + path) as response:
            await response.read()
            statuses.append(response.status)
    return statuses


def rows_by_route(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["route"]: row for row in snapshot["routes"]}


async def test_rates_errors_and_latency_over_the_window() -> None:
    release = asyncio.Event()
    dead = refused_port()
    try:
        async with (
            http_upstream(upstream_app(release)) as up,
            running_router(config(up, dead.getsockname()[1])) as router,
            aiohttp.ClientSession() as session,
        ):
            base = f"http://127.0.0.1:{router.listeners['web'].address[1]}"
            stats = HttpStats(router.stats)

            # Before the first sample: totals only, no window.
            assert await get(session, base, "/api/ok", 2) == [200, 200]
            first = stats.snapshot(now=0.0)
            assert first["window_seconds"] == 0
            [api] = first["routes"]
            assert (api["total"], api["rate"], api["mean_ms"], api["p99_ms"]) == (2, 0, None, None)

            stats.sample(now=0.0)
            assert await get(session, base, "/api/ok", 10) == [200] * 10
            assert await get(session, base, "/api/fail", 4) == [500] * 4  # the upstream's 5xx
            assert await get(session, base, "/dead", 3) == [503] * 3  # the proxy's own 5xx
            assert await get(session, base, "/slow/sleep/0", 6) == [200] * 6
            assert await get(session, base, "/nowhere", 1) == [404]  # no route matched
            stats.sample(now=2.0)

            snap = stats.snapshot(window=5.0, now=2.2)
            assert snap["window_seconds"] == 2.0
            rows = rows_by_route(snap)
            api = rows["api"]
            assert api["listener"] == "web" and api["cluster"] == "up"
            assert api["total"] == 16 and api["codes"] == {"2xx": 12, "5xx": 4}
            assert api["rate"] == 7.0  # 14 in 2 s; the 2 before the first sample are not in it
            assert api["errors_total"] == 4 and api["error_rate"] == 2.0
            # The latency of the 14 requests in the window: real (measured with perf_counter, not
            # uvloop's millisecond clock, so a sub-millisecond request is not 0), and ordered.
            assert 0 < api["p50_ms"] <= api["p99_ms"] and api["mean_ms"] > 0
            assert (rows["dead"]["total"], rows["dead"]["rate"], rows["dead"]["error_rate"]) == (3, 1.5, 1.5)
            assert rows["slow"]["rate"] == 3.0 and rows["slow"]["error_rate"] == 0
            assert (rows[""]["cluster"], rows[""]["codes"]) == ("", {"4xx": 1})
            # Busiest first.
            assert [row["route"] for row in snap["routes"]] == ["api", "slow", "dead", ""]
            assert snap["listeners"] == [
                {
                    "listener": "web",
                    "active_connections": router.stats.downstream_active["web"],
                    "rejected_total": 0,
                    "rejected_rate": 0.0,
                }
            ]
            clusters = {row["cluster"]: row for row in snap["clusters"]}
            assert set(clusters) == {"up", "dead"}  # "held" has answered nothing yet
            assert clusters["up"]["in_flight"] == 0 and clusters["up"]["connections"] >= 1

            # The latency is that of the window, not of the process: 3 requests of 60 ms
            # between t=2 and t=3 show as ~60 ms over a 1 s window, and are diluted by the
            # six quick ones over 5 s.
            assert await get(session, base, "/slow/sleep/60", 3) == [200] * 3
            stats.sample(now=3.0)
            recent = rows_by_route(stats.snapshot(window=1.0, now=3.0))["slow"]
            assert recent["rate"] == 3.0 and recent["total"] == 9
            assert recent["mean_ms"] >= 60 and recent["p50_ms"] >= 50
            longer = rows_by_route(stats.snapshot(window=5.0, now=3.0))["slow"]
            assert longer["rate"] == 3.0  # 9 in 3 s
            assert longer["mean_ms"] < recent["mean_ms"] and longer["p50_ms"] < recent["p50_ms"]
            # Nothing on a route in the window: no latency to show, rather than an old one.
            assert rows_by_route(stats.snapshot(window=1.0, now=3.0))["api"]["mean_ms"] is None

            # In flight: one request held at the upstream; max_requests 1 answers the next
            # one 503 at once (a circuit-breaker overflow, counted per cluster).
            release.set()
            assert await get(session, base, "/hold", 1) == [200]
            release.clear()
            held = asyncio.create_task(get(session, base, "/hold", 1))
            await wait_until(lambda: _in_flight(router, "held") == 1, what="a request in flight to held")
            assert await get(session, base, "/hold", 1) == [503]
            stats.sample(now=4.0)
            snap = stats.snapshot(window=1.0, now=4.0)
            clusters = {row["cluster"]: row for row in snap["clusters"]}
            assert clusters["held"]["in_flight"] == 1
            assert clusters["held"]["overflow_total"] == 1 and clusters["held"]["overflow_rate"] == 1.0
            assert snap["listeners"][0]["active_connections"] >= 2  # the held one and the other
            assert rows_by_route(snap)["hold"]["error_rate"] == 1.0
            release.set()
            assert await held == [200]
    finally:
        dead.close()


def _in_flight(router: Router, cluster: str) -> int:
    return sum(e.active for e in router.clusters[cluster].endpoints)


def test_a_stalled_sampler_gives_no_rates() -> None:
    stats = RouterStats()
    key = ("web", "", "", "", "", "api", "up", "2xx")
    http = HttpStats(stats)
    http.sample(now=10.0)
    stats.http_requests.inc(key, 5)
    stats.http_duration.observe(("web", "", "", "", "", "api"), 0.002)
    http.sample(now=11.0)
    assert rows_by_route(http.snapshot(now=11.0))["api"]["rate"] == 5.0
    # The newest sample is older than the window: no rate and no latency, totals still live.
    stale = http.snapshot(window=5.0, now=30.0)
    assert stale["window_seconds"] == 0
    [row] = stale["routes"]
    assert (row["total"], row["rate"], row["mean_ms"]) == (5, 0.0, None)
