"""The scheduler component: the reconciler with its drivers, fed by the config's `nodes` and `jobs`.

Runs in `pointsman up` when the config declares `jobs`, `nodes` or a `scheduler` section. It
starts after discovery (its allocations live in the registry's store, its instances are
registered in the registry) and stops first: instances are deregistered and stopped while the
router still drains them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from discovery.dns import DnsServer
from l7.model import Identity
from pointsman.sidecar import LocalUpstream, upstream_routes
from pointsman.supervisor import Component, RouterComponent
from scheduler.api import scheduler_routes
from scheduler.driver import Driver, DriverError
from scheduler.drivers.process import ProcessDriver
from scheduler.netns import NetworkNamespaces
from scheduler.reconciler import Reconciler
from scheduler.records import Sidecar

if TYPE_CHECKING:
    from aiohttp import web

    from pointsman.config import Config
    from pointsman.discovery_component import DiscoveryComponent

log = logging.getLogger("pointsman.scheduler")


def wants_scheduler(config: Config) -> bool:
    return bool(config.jobs) or config.nodes is not None or config.scheduler is not None


class SchedulerComponent(Component):
    name = "scheduler"
    config_section = "jobs"

    def __init__(
        self, discovery: DiscoveryComponent, router: RouterComponent | None = None, config_path: Path | None = None
    ) -> None:
        self.discovery = discovery
        self.router = router
        self.config_path = config_path
        self.reconciler: Reconciler | None = None
        self.network: NetworkNamespaces | None = None
        self.bridge_dns: DnsServer | None = None
        self._network_lock = asyncio.Lock()
        self._collector = SchedulerCollector(self)

    def _get(self) -> Reconciler:
        if self.reconciler is None:
            raise RuntimeError("the scheduler is not started")
        return self.reconciler

    async def start(self, config: Config) -> None:
        store, registry = self.discovery.store, self.discovery.registry
        assert store is not None and registry is not None, "discovery starts before the scheduler"
        state_dir = self.discovery.state_dir
        process = ProcessDriver(state_dir / "process")
        self.network = process.network
        drivers: dict[str, Driver] = {"process": process}
        try:
            from scheduler.drivers.docker import DockerDriver
        except ImportError as exc:  # the docker SDK is a dependency; say so rather than fail
            log.warning("docker driver unavailable: %s", exc)
        else:
            drivers["docker"] = DockerDriver(state_dir / "docker")
        algorithm = config.scheduler.algorithm if config.scheduler is not None else "binpack"
        variables = {"STATE_DIR": str(state_dir.resolve())}
        if self.config_path is not None:
            variables["CONFIG_DIR"] = str(self.config_path.resolve().parent)
        reconciler = Reconciler(
            store,
            registry,
            drivers,
            algorithm=algorithm,
            prepare_network=self._prepare_network,
            sidecars_changed=self._sidecars_changed if self.router is not None else None,
            variables=variables,
        )
        await reconciler.start(config.nodes, config.jobs)
        self.reconciler = reconciler

    async def reload(self, config: Config) -> None:
        reconciler = self._get()
        reconciler.algorithm = config.scheduler.algorithm if config.scheduler is not None else "binpack"
        await reconciler.set_declared(config.nodes, config.jobs)

    async def _prepare_network(self, driver: str) -> str | None:
        """On first use: the bridge for namespaced instances and, when discovery serves DNS, a
        second DNS server on the bridge's gateway port 53 (resolv.conf cannot name a port), for
        the namespaces and containers (docker0 reaches the host's addresses). Returns its address."""
        network = self.network
        assert network is not None
        async with self._network_lock:
            if self.bridge_dns is not None:
                return str(network.gateway)
            ok, why = network.available()
            if not ok:
                raise DriverError(why)
            await network.ensure_bridge()
            dns = self.discovery.dns
            if dns is None:
                log.warning("instances on %s have no internal DNS: the config has no discovery.dns", network.bridge)
                return None
            allow = [*dns.config.allow, str(network.subnet), "172.16.0.0/12"]  # docker0 is in 172.16/12
            config = dns.config.model_copy(update={"listen": (str(network.gateway), 53), "allow": allow})
            server = DnsServer(config, self.discovery.catalog)
            try:
                await server.start()
            except OSError as exc:
                raise DriverError(f"cannot serve DNS on {network.gateway}:53 for {driver} instances: {exc}") from None
            self.bridge_dns = server
            log.info("dns for instances on %s: %s:53", network.bridge, network.gateway)
            return str(network.gateway)

    async def _sidecars_changed(self, sidecars: Sequence[Sidecar]) -> None:
        """Every allocation's local listeners, as router listeners and clusters."""
        assert self.router is not None
        clusters, listeners = upstream_routes(
            LocalUpstream(
                name=f"sidecar.{car.alloc_id}.{car.service}",
                service=car.service,
                port=car.port,
                protocol=car.protocol,
                local_port=car.local_port,
                identity=Identity(car.job, car.version, car.alloc_id, car.node),
                policies=car.policies,
            )
            for car in sidecars
        )
        await self.router.set_generated(clusters, listeners)

    async def stop(self, deadline: float) -> None:
        reconciler, self.reconciler = self.reconciler, None
        if reconciler is not None:
            await reconciler.close()
            for driver in reconciler.drivers.values():
                close = getattr(driver, "close", None)
                if close is not None:
                    close()
        if self.bridge_dns is not None:
            await self.bridge_dns.stop()
            self.bridge_dns = None

    def endpoints(self) -> list[str]:
        if self.reconciler is None:
            return []
        r = self.reconciler
        drivers = ", ".join(
            f"{name}: {why}" if ok else f"{name}: unavailable ({why})" for name, (ok, why) in r.driver_ok.items()
        )
        return [f"scheduler {len(r.jobs)} job(s), {len(r.live())} allocation(s); drivers {drivers}"]

    def admin_routes(self) -> list[web.RouteDef]:
        return scheduler_routes(self._get)

    def collectors(self) -> list[Collector]:
        return [self._collector]


class SchedulerCollector(Collector):
    """Allocations by job, version, node and status; restarts; placements; unplaced instances."""

    def __init__(self, component: SchedulerComponent) -> None:
        self.component = component

    def collect(self) -> Iterator[Any]:
        reconciler = self.component.reconciler
        if reconciler is None:
            return
        # A job is an app: the label vocabulary is the one the SQL and HTTP series use.
        allocs = GaugeMetricFamily(
            "pointsman_scheduler_allocations",
            "Allocations by app (job), version, node, status and health",
            labels=("app", "version", "node", "status", "health"),
        )
        counts: dict[tuple[str, str, str, str, str], int] = {}
        for alloc in reconciler.live():
            key = (alloc.job, alloc.version, alloc.node, alloc.status, alloc.health or "unknown")
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            allocs.add_metric(key, float(n))
        yield allocs
        restarts = CounterMetricFamily("pointsman_scheduler_restarts", "Task restarts by app (job)", labels=("app",))
        for job, n in sorted(reconciler.restarts_total.items()):
            restarts.add_metric((job,), float(n))
        yield restarts
        placements = CounterMetricFamily("pointsman_scheduler_placements", "Allocations placed")
        placements.add_metric((), float(reconciler.placements))
        yield placements
        unplaced = GaugeMetricFamily(
            "pointsman_scheduler_unplaced_instances", "Instances that fit on no node", labels=("app",)
        )
        for job, entry in sorted(reconciler.unplaced.items()):
            unplaced.add_metric((job,), float(entry.count))
        yield unplaced
        # Which instance and service each sidecar listener serves (its HTTP and SQL series carry
        # the instance's app, version, instance and node themselves).
        info = GaugeMetricFamily(
            "pointsman_sidecar_info",
            "1 per sidecar listener, with the identity of the instance it serves",
            labels=("listener", "app", "version", "instance", "node", "service"),
        )
        for group in reconciler.sidecars.values():
            for car in group:
                name = f"sidecar.{car.alloc_id}.{car.service}"
                info.add_metric((name, car.job, car.version, car.alloc_id, car.node, car.service), 1.0)
        yield info
