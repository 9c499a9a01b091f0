"""The README's PromQL answer, checked against a real Prometheus.

A real ``pointsman up`` (a postgres listener in front of the session's throwaway PostgreSQL,
an http listener in front of an aiohttp upstream) is scraped every second by Debian's
``prometheus`` running on a free port with its own config and storage in tmp_path. Two apps
insert at known rates (``orders`` 4x ``billing``) while HTTP requests go through the router at
a third rate; then Prometheus's HTTP API is asked what the README asks it:

    sum by (app) (rate(pointsman_sql_statements_total{verb="INSERT"}[30s]))

and the answers are compared with the traffic sent: the raw counters exactly, the rates within
the slack of Prometheus's extrapolation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml
from aiohttp import web

from tests.pgserver import DATABASE, SUPERUSER, PgServer
from tests.pointsman.harness import PointsmanProcess, http_upstream, pointsman, up_args, write_config
from tests.support import missing

SECONDS = 8  # of paced traffic
ORDERS_PER_S = 40  # INSERTs per second from app "orders"
BILLING_PER_S = 10  # ... and from app "billing"
HTTP_PER_S = 25  # requests per second through the http listener
RANGE = 30.0  # the README query's [30s]

WEB_CLIENT = {"app": "shop", "version": "v7", "instance": "shop-0-a1", "node": "n1"}
SQL_INSERTS = 'pointsman_sql_statements_total{verb="INSERT"}'
HTTP_REQUESTS = 'pointsman_http_requests_total{listener="web"}'


@pytest.fixture
def prometheus_bin() -> str:
    """Debian's prometheus (`make deps` installs it). Missing: skipped on a developer's machine,
    a failure under CI, where a missing package must not turn into a quietly green run."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if found is None:
        missing("no prometheus binary (apt-get install prometheus, or `make deps` as root)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prometheus:
    url: str  # http://127.0.0.1:PORT
    http: aiohttp.ClientSession
    log: Path

    async def query(self, promql: str, at: float) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query evaluated at ``at`` (Unix time): each series' labels -> value."""
        params = {"query": promql, "time": f"{at:.3f}"}
        async with self.http.get(f"{self.url}/api/v1/query", params=params) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}

    async def by_app(self, promql: str, at: float) -> dict[str, float]:
        return {dict(labels)["app"]: value for labels, value in (await self.query(promql, at)).items()}

    async def scalar(self, promql: str, at: float) -> float | None:
        """The value of a query whose answer is one series without labels (or nothing)."""
        result = await self.query(promql, at)
        assert len(result) <= 1, result
        return next(iter(result.values()), None)

    async def wait_for(self, what: str, check: Callable[[float], Awaitable[bool]], timeout: float = 10.0) -> float:
        """Poll until ``await check(now)`` is true; the (Unix) time at which it was."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.time()
            if await check(now):
                return now
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not show {what} within {timeout}s:\n{self.log.read_text()}")
            await asyncio.sleep(0.2)


@asynccontextmanager
async def run_prometheus(binary: str, workdir: Path, target: str) -> AsyncIterator[Prometheus]:
    """``prometheus`` on 127.0.0.1:<free port>, scraping ``target``'s /metrics every second,
    its config, data and log under ``workdir``; stopped (then killed) on the way out."""
    workdir.mkdir()
    config = workdir / "prometheus.yml"
    scrape = {"scrape_interval": "1s", "scrape_timeout": "1s"}
    # honor_labels: the series' own `instance` label (the client's instance) is kept rather than
    # renamed exported_instance in favour of the scrape target's; README says the same.
    job = {"job_name": "pointsman", **scrape, "honor_labels": True, "static_configs": [{"targets": [target]}]}
    config.write_text(yaml.safe_dump({"global": scrape, "scrape_configs": [job]}), encoding="utf-8")
    log = workdir / "prometheus.log"
    for _attempt in range(3):  # the free port can be taken between the probe and prometheus's bind
        port = _free_port()
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                url = f"http://127.0.0.1:{port}"
                if await _ready(proc, http, url):
                    yield Prometheus(url, http, log)
                    return
            if "address already in use" not in log.read_text():
                break
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
            await proc.wait()
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text()}")


async def _ready(proc: asyncio.subprocess.Process, http: aiohttp.ClientSession, url: str) -> bool:
    """Whether it answers /-/ready within 15 s (False when it exited first)."""
    deadline = time.monotonic() + 15
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            async with http.get(f"{url}/-/ready") as resp:
                if resp.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    return False


@dataclass
class Stack:
    pointsman: PointsmanProcess
    prometheus: Prometheus
    db: str  # host:port of the postgres listener
    web: str  # host:port of the http listener


def _hello() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


@pytest.fixture
async def stack(prometheus_bin: str, tmp_path: Path, pg_server: PgServer) -> AsyncIterator[Stack]:
    """pointsman up (postgres and http listeners, admin on a port of its choosing) and a
    Prometheus scraping its admin API; all stopped at the end, whatever happens."""
    async with http_upstream(_hello()) as (host, port):
        config = tmp_path / "pointsman.yaml"
        write_config(
            config,
            {
                "admin": {"listen": "127.0.0.1:0"},
                "clusters": {
                    "pg": {"endpoints": [f"127.0.0.1:{pg_server.port}"]},
                    "hello": {"endpoints": [f"{host}:{port}"]},
                },
                "listeners": [
                    {"name": "db", "listen": "127.0.0.1:0", "protocol": "postgres", "to": "pg"},
                    {
                        "name": "web",
                        "listen": "127.0.0.1:0",
                        "protocol": "http",
                        "routes": [{"match": {"path_prefix": "/"}, "to": "hello"}],
                        # as a sidecar's listener is: every client is one instance of one app
                        "identity": WEB_CLIENT,
                    },
                ],
            },
        )
        async with pointsman(*up_args(config)) as proc:
            async with aiohttp.ClientSession() as http, http.get(proc.url("/status")) as resp:
                listeners = (await resp.json())["listeners"]
            async with run_prometheus(prometheus_bin, tmp_path / "prometheus", proc.admin) as prom:
                yield Stack(proc, prom, listeners["db"], listeners["web"])


async def _connect(db: str, app: str) -> psycopg.AsyncConnection[Any]:
    host, port = db.rsplit(":", 1)
    return await psycopg.AsyncConnection.connect(
        host=host,
        port=port,
        user=SUPERUSER,
        dbname=DATABASE,
        application_name=app,
        sslmode="disable",
        connect_timeout=5,
        autocommit=True,
    )


async def _paced(per_second: int, start: float, send: Callable[[], Awaitable[None]]) -> int:
    """``per_second * SECONDS`` calls of ``send``, the i-th at ``start + i / per_second`` (loop
    time): a fixed schedule, so the rate holds even when one call is slow. How many were sent."""
    loop = asyncio.get_running_loop()
    total = per_second * SECONDS
    for i in range(total):
        delay = start + i / per_second - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send()
    return total


async def test_prometheus_answers_the_readme_query_with_the_traffic_sent(stack: Stack, pg_server: PgServer) -> None:
    prom = stack.prometheus
    table = f"prom_inserts_{os.getpid()}"
    # Created directly, not through the listener: only the paced INSERTs are counted.
    async with await psycopg.AsyncConnection.connect(pg_server.dsn(), autocommit=True) as direct:
        await direct.execute(f"DROP TABLE IF EXISTS {table}")
        await direct.execute(f"CREATE TABLE {table} (app text, n int)")

    async with (
        await _connect(stack.db, "orders") as orders,
        await _connect(stack.db, "billing") as billing,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):
        sent = {"orders": 0, "billing": 0}
        requests = 0

        async def insert(conn: psycopg.AsyncConnection[Any], app: str) -> None:
            await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (app, sent[app]))
            sent[app] += 1

        async def get() -> None:
            nonlocal requests
            async with http.get(f"http://{stack.web}/hello") as resp:
                assert resp.status == 200
                await resp.read()
            requests += 1

        # One of each first, and wait until Prometheus has scraped them: every series exists
        # (at 1) before the paced traffic starts, so rate() sees the whole increase.
        await insert(orders, "orders")
        await insert(billing, "billing")
        await get()

        async def warmed_up(now: float) -> bool:
            apps = await prom.by_app(f"sum by (app) ({SQL_INSERTS})", now)
            return apps == {"orders": 1, "billing": 1} and await prom.scalar(f"sum({HTTP_REQUESTS})", now) == 1

        await prom.wait_for("the first INSERT of each app and the first request", warmed_up)

        loop = asyncio.get_running_loop()
        start, wall_start = loop.time() + 0.05, time.time() + 0.05
        async with asyncio.TaskGroup() as group:
            group.create_task(_paced(ORDERS_PER_S, start, lambda: insert(orders, "orders")))
            group.create_task(_paced(BILLING_PER_S, start, lambda: insert(billing, "billing")))
            group.create_task(_paced(HTTP_PER_S, start, get))
        took = loop.time() - start

    # The raw counters, once a scrape after the last statement has landed: exactly what was sent.
    async def all_counted(now: float) -> bool:
        apps = await prom.by_app(f"sum by (app) ({SQL_INSERTS})", now)
        return apps == sent and await prom.scalar(f"sum({HTTP_REQUESTS})", now) == requests

    at = await prom.wait_for(f"{sent} INSERTs and {requests} requests", all_counted)
    assert sent == {"orders": 1 + ORDERS_PER_S * SECONDS, "billing": 1 + BILLING_PER_S * SECONDS}
    # The [30s] window must hold every sample from before the traffic to now.
    assert at - RANGE < wall_start - 2, f"the test took too long for a {RANGE:.0f}s window"

    # The README's query, verbatim. Over a 30 s window that holds all the traffic, rate() is the
    # window's increase (extrapolated at most a scrape interval past the last sample) over 30 s.
    readme = await prom.by_app(f"sum by (app) (rate({SQL_INSERTS}[{RANGE:.0f}s]))", at)
    http_rate = await prom.scalar(f"sum(rate({HTTP_REQUESTS}[{RANGE:.0f}s]))", at)
    expected = {"orders": ORDERS_PER_S * SECONDS / RANGE, "billing": BILLING_PER_S * SECONDS / RANGE}
    http_expected = HTTP_PER_S * SECONDS / RANGE
    print(f"traffic {took:.2f}s, sent {sent} and {requests} requests; at {at:.3f}: {readme}, http {http_rate}")
    assert set(readme) == {"orders", "billing"}, readme
    for app, rate in readme.items():
        assert expected[app] * 0.95 <= rate <= expected[app] * 1.2, (app, rate, expected[app])
    assert http_rate is not None, "no HTTP request rate"
    assert http_expected * 0.95 <= http_rate <= http_expected * 1.2, (http_rate, http_expected)
    ratio = ORDERS_PER_S / BILLING_PER_S
    assert ratio * 0.7 <= readme["orders"] / readme["billing"] <= ratio * 1.3, readme

    # "How many INSERTs per second come from app A?" while it runs: the same query over a window
    # inside the paced traffic answers the rates sent.
    mid = wall_start + SECONDS - 1.5
    steady = await prom.by_app(f"sum by (app) (rate({SQL_INSERTS}[4s]))", mid)
    steady_http = await prom.scalar(f"sum(rate({HTTP_REQUESTS}[4s]))", mid)
    print(f"at traffic start + {SECONDS - 1.5}s, rate[4s]: {steady}, http {steady_http}")
    for app, per_second in (("orders", ORDERS_PER_S), ("billing", BILLING_PER_S)):
        assert per_second * 0.75 <= steady[app] <= per_second * 1.25, (app, steady, per_second)
    assert steady_http is not None and HTTP_PER_S * 0.75 <= steady_http <= HTTP_PER_S * 1.25, steady_http

    # The HTTP rate by the client's identity labels: the same series, named by who sent them.
    by_identity = await prom.query(f"sum by (app, version, instance, node) (rate({HTTP_REQUESTS}[4s]))", mid)
    assert list(by_identity) == [tuple(sorted(WEB_CLIENT.items()))], by_identity
