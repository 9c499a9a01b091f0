"""The discovery component: state store, registry (with its HTTP API) and the DNS server.

Runs when the config has a ``discovery`` section (``pointsman up``) or alone (``pointsman
dns``). Its catalog is shared with the router, whose clusters can follow a service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from discovery.api import registry_routes
from discovery.config import DiscoveryConfig
from discovery.dns import DnsServer
from discovery.model import Catalog
from discovery.registry import Registry
from discovery.store_sqlite import SqliteStore
from pointsman.supervisor import Component

if TYPE_CHECKING:
    from aiohttp import web

    from pointsman.config import Config

log = logging.getLogger("pointsman.discovery")

STATE_FILE = "registry.db"


def default_state_dir() -> Path:
    """``$POINTSMAN_STATE_DIR``, else ``.pointsman`` in the working directory (absolute): a
    restart from the same place finds the registry, the allocations and their logs where it
    left them, and `make run` keeps them inside the checkout (ignored by git)."""
    return Path(os.environ.get("POINTSMAN_STATE_DIR") or ".pointsman").resolve()


class RegistryCollector(Collector):
    """``pointsman_registry_services`` and ``pointsman_registry_instances{service, health}``."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Any]:
        snapshot = self.catalog.snapshot
        services = GaugeMetricFamily("pointsman_registry_services", "Services with at least one instance")
        services.add_metric((), float(len(snapshot.services)))
        yield services
        instances = GaugeMetricFamily(
            "pointsman_registry_instances", "Registered instances by service and health", labels=("service", "health")
        )
        for name, items in snapshot.services.items():
            for health in ("passing", "warning", "critical"):
                instances.add_metric((name, health), float(sum(1 for i in items if i.health == health)))
        yield instances
        revision = GaugeMetricFamily("pointsman_registry_revision", "The registry's store revision")
        revision.add_metric((), float(snapshot.revision))
        yield revision


class DiscoveryComponent(Component):
    name = "discovery"
    config_section = "discovery"

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.store: SqliteStore | None = None
        self.registry: Registry | None = None
        self.dns: DnsServer | None = None
        self.state_dir = default_state_dir()
        self._dns_config: object = None
        self._registry_collector = RegistryCollector(catalog)
        self._dns_collector = _Forward()

    async def start(self, config: Config) -> None:
        section = config.discovery or DiscoveryConfig()
        state_dir = Path(section.state_dir) if section.state_dir else default_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.store = SqliteStore(str(state_dir / STATE_FILE))
        await self.store.start()
        self.registry = Registry(self.store, self.catalog)
        await self.registry.start()
        await self._sync_static(section)
        log.info("registry: %s (revision %d)", state_dir / STATE_FILE, self.store.revision)
        await self._start_dns(section)

    async def _start_dns(self, section: DiscoveryConfig) -> None:
        self._dns_config = section.dns
        if section.dns is None:
            return
        server = DnsServer(section.dns, self.catalog)
        await server.start()
        self.dns = server
        self._dns_collector.target = server.collector

    async def reload(self, config: Config) -> None:
        section = config.discovery or DiscoveryConfig()
        assert self.registry is not None
        if section.dns != self._dns_config:
            # Bind the new server first: if its address is taken the old one keeps serving.
            old = self.dns
            if old is not None and section.dns is not None and old_address_reused(old, section):
                await old.stop()
                old = None
            previous = self._dns_config
            try:
                self.dns = None
                await self._start_dns(section)
            except OSError:
                self._dns_config = previous
                self.dns = old
                raise
            if old is not None:
                await old.stop()
        await self._sync_static(section)

    async def _sync_static(self, section: DiscoveryConfig) -> None:
        """The config's services into the registry, with the health the config gives them."""
        assert self.registry is not None
        await self.registry.sync_static(section.registrations())
        for svc in section.services:
            for inst in svc.instances:
                # A static instance is passing unless the config says otherwise.
                if inst.health != "passing" and self.registry.health_of_instance(svc.name, inst.id) != inst.health:
                    await self.registry.set_health(svc.name, inst.id, inst.health, "set in the config")

    async def stop(self, deadline: float) -> None:
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None
        if self.registry is not None:
            await self.registry.close()
        if self.store is not None:
            await self.store.close()

    def endpoints(self) -> list[str]:
        out = []
        if self.dns is not None:
            host, port = self.dns.address[:2]
            out.append(f"dns udp+tcp {host}:{port}")
        return out

    def admin_routes(self) -> list[web.RouteDef]:
        return registry_routes(_LateRegistry(self))  # type: ignore[arg-type]

    def collectors(self) -> list[Collector]:
        return [self._registry_collector, self._dns_collector]


def old_address_reused(old: DnsServer, section: DiscoveryConfig) -> bool:
    """The new DNS config listens where the old server does: it must close first."""
    assert section.dns is not None
    host, port = section.dns.listen
    return port != 0 and (host, port) == tuple(old.address[:2])


class _Forward(Collector):
    """The DNS server's collector, once there is one (registered before start)."""

    def __init__(self) -> None:
        self.target: Collector | None = None

    def collect(self) -> Iterator[Any]:
        if self.target is not None:
            yield from self.target.collect()


class _LateRegistry:
    """Admin routes are built before start; the registry exists only after it."""

    def __init__(self, component: DiscoveryComponent) -> None:
        self._component = component

    def __getattr__(self, name: str) -> Any:
        registry = self._component.registry
        if registry is None:
            raise RuntimeError("the registry is not started")
        return getattr(registry, name)
