"""The admin API (aiohttp): metrics, health, readiness, the running config, reloads.

GET  /metrics   Prometheus exposition of the process registry
GET  /healthz   200 "ok" while the process runs (liveness)
GET  /readyz    200 once every component started; 503 while starting or draining
GET  /config    the effective config, its hash and the file it came from
GET  /status    state, config hash, the last reload (source, time, result, errors), listener addresses
GET  /clusters  (router) every cluster and endpoint with health and ejection state
GET  /sql/stats (router) SQL statements per listener, app and verb: totals, rates, latency
GET  /http/stats (router) HTTP requests per listener, route and cluster: totals, rates, 5xx, latency
POST /reload    load the config file again: 200 reloaded/unchanged, 400 with the errors

The admin server is the supervisor's first component: it starts before the others and stops
after them, so probes get a truthful 503 during startup and during the drain.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pointsman.metrics import exposition
from pointsman.supervisor import Component, RouterComponent
from router.config import format_address

if TYPE_CHECKING:
    from pointsman.config import Config
    from pointsman.supervisor import Supervisor
    from router.http_stats import HttpStats
    from router.listeners import Router
    from router.sql_metrics import SqlStats

log = logging.getLogger("pointsman.admin")

# Admin requests are short; waiting longer for one at shutdown only delays the exit.
_SHUTDOWN_GRACE = 2.0


class AdminServer(Component):
    """The admin API as the supervisor's first component."""

    name = "admin"
    config_section = "admin.listen"

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.runner: web.AppRunner | None = None
        self.listen: tuple[str, int] | None = None
        self.address: tuple[str, int] | None = None

    def build_app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/metrics", self.handle_metrics),
                web.get("/healthz", self.handle_healthz),
                web.get("/readyz", self.handle_readyz),
                web.get("/config", self.handle_config),
                web.get("/status", self.handle_status),
                web.post("/reload", self.handle_reload),
            ]
        )
        for component in self.supervisor.components:
            if component is not self:
                app.add_routes(component.admin_routes())
        return app

    # -- component interface ----------------------------------------------------------

    async def start(self, config: Config) -> None:
        runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        host, port = config.admin.listen
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.runner = runner
        self.listen = config.admin.listen
        sockname = runner.addresses[0]
        self.address = (sockname[0], sockname[1])

    async def reload(self, config: Config) -> None:
        # Moving the admin socket would close the connection that may be asking for this
        # very reload; it is one of the few settings that need a restart.
        if config.admin.listen != self.listen:
            log.warning(
                "admin.listen changed to %s: it takes effect on restart; the admin API stays on %s",
                format_address(config.admin.listen),
                format_address(self.address or config.admin.listen),
            )

    async def stop(self, deadline: float) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()

    def endpoints(self) -> list[str]:
        return [f"admin {format_address(self.address)}"] if self.address is not None else []

    # -- handlers -----------------------------------------------------------------------

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.supervisor.registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_readyz(self, request: web.Request) -> web.Response:
        state = self.supervisor.state.value
        return web.Response(text=f"{state}\n", status=200 if self.supervisor.ready else 503)

    async def handle_config(self, request: web.Request) -> web.Response:
        supervisor = self.supervisor
        return web.json_response(
            {
                "file": str(supervisor.config_path),
                "hash": supervisor.digest,
                "config": supervisor.config.model_dump(mode="json"),
            }
        )

    async def handle_status(self, request: web.Request) -> web.Response:
        supervisor = self.supervisor
        last: dict[str, Any] | None = None
        if supervisor.last_reload is not None:
            source, at, result = supervisor.last_reload
            when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
            last = {"source": source, "at": when, **result.as_dict()}
        router = supervisor.component("router")
        listeners = (
            {name: format_address(h.address) for name, h in router.router.listeners.items()}
            if isinstance(router, RouterComponent)
            else {}
        )
        body = {
            "state": supervisor.state.value,
            "file": str(supervisor.config_path),
            "hash": supervisor.digest,
            "last_reload": last,
            "listeners": listeners,  # name -> the address it is bound to (listen may say port 0)
        }
        return web.json_response(body)

    async def handle_reload(self, request: web.Request) -> web.Response:
        result = await self.supervisor.reload("admin API")
        status = {"reloaded": 200, "unchanged": 200, "refused": 400}.get(result.status, 503)
        return web.json_response(result.as_dict(), status=status)


def cluster_routes(router: Router) -> list[web.RouteDef]:
    """``GET /clusters``: the router's clusters, each endpoint with health and ejection state."""

    async def clusters(request: web.Request) -> web.Response:
        return web.json_response(router.snapshot())

    return [web.get("/clusters", clusters)]


def sql_routes(stats: SqlStats) -> list[web.RouteDef]:
    """``GET /sql/stats``: per listener, app and verb: totals, rates over the last seconds,
    latency; denials per rule; the classification cache's hit rate."""

    async def sql_stats(request: web.Request) -> web.Response:
        return web.json_response(stats.snapshot())

    return [web.get("/sql/stats", sql_stats)]


def http_routes(stats: HttpStats) -> list[web.RouteDef]:
    """``GET /http/stats``: per listener, route and cluster: totals, requests/s and 5xx/s
    over the last seconds, latency over the same window; open connections, in-flight
    requests (from the samples the router component takes once a second)."""

    async def http_stats(request: web.Request) -> web.Response:
        return web.json_response(stats.snapshot())

    return [web.get("/http/stats", http_stats)]
