"""`pointsman sidecar --app NAME`: the router's local listeners for one app of ``sidecars:``,
forwarding to services of a remote registry that this process follows over HTTP.

Runs under the same :class:`Supervisor` as ``up`` (admin API, reloads on SIGHUP, file change
and ``POST /reload``, drain on SIGTERM), with two components: the router, and this one, which
follows the registry into the router's catalog and hands the app's listeners to the router as
generated ones (as the scheduler does for its allocations' sidecars).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from discovery.model import Catalog
from discovery.remote import RemoteCatalog
from l7.model import Identity
from pointsman.config import Config
from pointsman.sidecar import LocalUpstream, SidecarConfig, SidecarUpstream, upstream_routes
from pointsman.supervisor import DEFAULT_DRAIN_TIMEOUT, DEFAULT_WATCH_INTERVAL, Component, RouterComponent, Supervisor
from router.config import format_address
from router.metrics import RouterStats

log = logging.getLogger("pointsman.sidecar")

# How long start waits for the registry's first answer before serving with an empty catalog.
FIRST_SYNC_TIMEOUT = 5.0


def find_sidecar(config: Config, app: str) -> SidecarConfig | None:
    return next((car for car in config.sidecars if car.app == app), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _registry_url(address: tuple[str, int]) -> str:
    host, port = address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{format_address((host, port))}"


class SidecarComponent(Component):
    name = "sidecar"
    config_section = "sidecars"

    def __init__(self, router: RouterComponent, app: str, catalog: Catalog) -> None:
        self.router = router
        self.app = app
        self.catalog = catalog
        self.follower: RemoteCatalog | None = None
        self.entry: SidecarConfig | None = None
        # Local ports picked for `auto` upstreams, by service: kept across reloads, so the
        # addresses the app was given stay valid.
        self.auto_ports: dict[str, int] = {}

    def _entry(self, config: Config) -> SidecarConfig:
        entry = find_sidecar(config, self.app)
        if entry is None:
            raise ValueError(f"no sidecars[] entry has app {self.app!r}")
        return entry

    def local_port(self, upstream: SidecarUpstream, picked: dict[str, int]) -> int:
        if isinstance(upstream.local_port, int):
            return upstream.local_port
        if upstream.service not in picked:
            picked[upstream.service] = _free_port()
        return picked[upstream.service]

    async def _apply(self, entry: SidecarConfig) -> None:
        picked = dict(self.auto_ports)
        clusters, listeners = upstream_routes(
            LocalUpstream(
                name=entry.listener_name(up),
                service=up.service,
                port=up.port,
                protocol=up.protocol,
                local_port=self.local_port(up, picked),
                identity=Identity(entry.app, entry.version, entry.instance, entry.node or socket.gethostname()),
                policies=tuple(up.policies),
            )
            for up in entry.upstreams
        )
        await self.router.set_generated(clusters, listeners)  # binds, or raises and changes nothing
        self.auto_ports = picked
        self.entry = entry

    def env(self) -> list[str]:
        """``VAR=address`` per upstream, what the app is started with."""
        entry = self.entry
        if entry is None:
            return []
        out = []
        for up in entry.upstreams:
            port = up.local_port if isinstance(up.local_port, int) else self.auto_ports[up.service]
            value = f"http://127.0.0.1:{port}" if up.protocol == "http" else f"127.0.0.1:{port}"
            out.append(f"{up.variable}={value}")
        return out

    async def _follow(self, entry: SidecarConfig) -> None:
        url = _registry_url(entry.registry)
        if self.follower is not None and self.follower.base_url == url:
            return
        if self.follower is not None:
            await self.follower.stop()
        self.follower = RemoteCatalog(url, self.catalog)
        self.follower.start()
        # The listeners are useful once the catalog has endpoints: give the registry a moment.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.follower.synced.wait(), FIRST_SYNC_TIMEOUT)

    async def start(self, config: Config) -> None:
        entry = self._entry(config)
        await self._follow(entry)
        await self._apply(entry)

    async def reload(self, config: Config) -> None:
        entry = self._entry(config)
        before = set(self.env())
        await self._apply(entry)
        await self._follow(entry)
        for line in self.env():
            if line not in before:
                log.info("sidecar %s: %s", self.app, line)

    async def stop(self, deadline: float) -> None:
        # The router (stopped after this) drains with the last catalog.
        if self.follower is not None:
            await self.follower.stop()
            self.follower = None

    def endpoints(self) -> list[str]:
        follower = self.follower
        if follower is None:
            return []
        if follower.connected:
            state = f"connected, revision {follower.revision}"
        else:
            state = f"unreachable ({follower.last_error}), revision {follower.revision}"
        return [f"sidecar {self.app}: registry {follower.base_url} ({state})"]


def build_sidecar_supervisor(
    config: Config,
    config_path: str | Path,
    app: str,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    watch_interval: float | None = DEFAULT_WATCH_INTERVAL,
) -> tuple[Supervisor, SidecarComponent]:
    """The admin API, the router (the file's own listeners and the app's local ones) and the
    registry follower feeding the router's catalog."""
    stats = RouterStats()
    catalog = Catalog()
    router = RouterComponent(stats, catalog)
    sidecar = SidecarComponent(router, app, catalog)
    supervisor = Supervisor(
        config, config_path, [router, sidecar], stats=stats, drain_timeout=drain_timeout, watch_interval=watch_interval
    )
    return supervisor, sidecar
