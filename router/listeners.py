"""The router's runtime: clusters and listeners built from config, swapped atomically on reload.

:meth:`Router.apply` builds the new clusters and route tables off to the side (nothing
running is touched while it builds), then swaps them in: a listener whose address and
protocol are unchanged keeps its socket and just gets the new table, so no connection is
refused during a reload. Clusters whose config is unchanged are carried over with their
health state, ejections and idle connections. Requests already in flight keep the
route and cluster objects they started with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from discovery.model import Catalog, Snapshot
from l7.model import Identity
from l7.policy import PolicyEngine
from l7.policy_config import PolicyRule
from l7.sql_context import SqlContext
from router.cluster import Cluster, Endpoint
from router.config import SQL_PROTOCOLS, ClusterConfig, ListenerConfig, format_address
from router.metrics import RouterStats
from router.routes import RouteTable
from router.sql_metrics import SqlStats

log = logging.getLogger("pointsman.router")


class Connection(Protocol):
    """What a listener's protocol objects offer for draining."""

    def begin_drain(self) -> None:
        """Finish the request in flight (if any), then close; accept no new request."""

    def abort(self) -> None:
        """Close at once."""


class ListenerHandle:
    """One listening socket and what its connections read at each new request or session."""

    def __init__(self, config: ListenerConfig, stats: RouterStats) -> None:
        self.config = config
        self.name = config.name
        self.stats = stats
        self.table: RouteTable | None = None  # http
        self.cluster: Cluster | None = None  # tcp, postgres
        self.sql: SqlContext | None = None  # postgres, mysql: counting and policy, swapped on reload
        self.sql_tls: ssl.SSLContext | None = None
        # http, postgres, mysql: the clients' identity when the config fixes it; else a lookup
        # of the instance owning a client address (placement), when the router follows a registry
        self.source: Identity | None = config.source()
        self.identify: Callable[[str], Identity | None] | None = None
        self.pg_backends: dict[tuple[int, bytes], Endpoint] = {}  # (pid, key) -> its server
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self.idle_event = asyncio.Event()
        self.idle_event.set()

    @property
    def address(self) -> tuple[str, int]:
        """Where it really listens (the port that was bound when the config said 0)."""
        if self.server is not None and self.server.sockets:
            sockname = self.server.sockets[0].getsockname()
            return sockname[0], sockname[1]
        return self.config.listen

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.idle_event.clear()
        self.stats.downstream_active[self.name] += 1

    def remove(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.downstream_active[self.name] -= 1
            if not self.connections:
                self.idle_event.set()

    def track(self, task: asyncio.Task[None]) -> None:
        """Own a short task of a connection (a CancelRequest being forwarded)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def same_socket(self, config: ListenerConfig) -> bool:
        return config.listen == self.config.listen and config.protocol == self.config.protocol

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        factory: Callable[[], asyncio.BaseProtocol]
        if self.config.protocol == "http":
            from router.http_proxy import HttpProxyProtocol

            factory = lambda: HttpProxyProtocol(self)  # noqa: E731
        elif self.config.protocol == "postgres":
            from router.pg_proxy import PgProxyProtocol

            factory = lambda: PgProxyProtocol(self)  # noqa: E731
        elif self.config.protocol == "mysql":
            from router.mysql_proxy import MySqlProxyProtocol

            factory = lambda: MySqlProxyProtocol(self)  # noqa: E731
        else:
            from router.tcp_proxy import TcpProxyProtocol

            factory = lambda: TcpProxyProtocol(self)  # noqa: E731
        self.server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        log.info("listener %s (%s) on %s", self.name, self.config.protocol, format_address(self.address))

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, let connections finish their request in flight, abort the rest at
        the deadline (a ``time.monotonic()`` value)."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.begin_drain()
        timeout = max(0.0, deadline - time.monotonic())
        try:
            if not self.idle_event.is_set():
                await asyncio.wait_for(self.idle_event.wait(), timeout)
        except TimeoutError:
            if self.connections:
                log.warning(
                    "listener %s: %d connections still open at the drain deadline, closing them",
                    self.name,
                    len(self.connections),
                )
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self.server is not None:
            await self.server.wait_closed()


class Router:
    """Owns every listener and cluster of the process."""

    def __init__(
        self, stats: RouterStats | None = None, sql_stats: SqlStats | None = None, catalog: Catalog | None = None
    ) -> None:
        self.stats = stats or RouterStats()
        self.sql_stats = sql_stats or SqlStats()
        # The registry's view, for clusters that follow a service (None: no discovery running).
        self.catalog = catalog
        self._following: dict[Cluster, Callable[[], None]] = {}
        self.clusters: dict[str, Cluster] = {}
        self.listeners: dict[str, ListenerHandle] = {}
        self.stats.clusters_source = self._all_clusters
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # Client address -> the registered instance that owns it (its service as the app), for
        # instances with an address of their own; loopback and shared addresses are left out.
        self._owners: dict[str, Identity] = {}
        if catalog is not None:
            catalog.subscribe(self._index_owners)

    def _index_owners(self, snapshot: Snapshot) -> None:
        owners: dict[str, Identity] = {}
        shared: set[str] = set()
        for service, instances in snapshot.services.items():
            for instance in instances:
                identity = Identity(service, instance.version or "", instance.id, instance.node or "")
                # Its registered address, and where its connections come from when that differs
                # (a container's bridge address; its ports are published on 127.0.0.1).
                for address in {instance.address, instance.meta.get("source_address") or instance.address}:
                    if address.startswith("127.") or address == "::1" or address in shared:
                        continue
                    if address in owners:  # two instances at one address: nobody's in particular
                        shared.add(address)
                        del owners[address]
                        continue
                    owners[address] = identity
        self._owners = owners

    def owner_of(self, address: str) -> Identity | None:
        """The instance at a client address (placement-derived identity)."""
        return self._owners.get(address)

    def _all_clusters(self) -> Iterator[Cluster]:
        return iter(list(self.clusters.values()))

    async def apply(
        self,
        clusters: Mapping[str, ClusterConfig],
        listeners: Sequence[ListenerConfig],
        policies: Sequence[PolicyRule] = (),
    ) -> None:
        """Make the running router match this (already validated) config.

        Binding a new listener's socket is the one step that can fail after validation (the
        port is taken). Sockets are bound first, before anything running changes, so such a
        failure leaves the running config whole.
        """
        async with self._lock:
            # 1. Build off to the side.
            new_clusters: dict[str, Cluster] = {}
            for name, cluster_config in clusters.items():
                old = self.clusters.get(name)
                reuse = old is not None and old.config == cluster_config
                new_clusters[name] = old if reuse and old is not None else Cluster(name, cluster_config)
            new_handles: dict[str, ListenerHandle] = {}
            to_start: list[ListenerHandle] = []
            for config in listeners:
                old_handle = self.listeners.get(config.name)
                if old_handle is not None and old_handle.same_socket(config):
                    handle = old_handle
                else:
                    handle = ListenerHandle(config, self.stats)
                    to_start.append(handle)
                new_handles[config.name] = handle
            tables = {
                c.name: RouteTable.build(c.name, c.routes, new_clusters) for c in listeners if c.routes is not None
            }
            rules = {rule.name: rule for rule in policies}
            sql = {
                c.name: self._sql_context(c, rules, self.listeners.get(c.name))
                for c in listeners
                if c.protocol in SQL_PROTOCOLS
            }
            # 2. Bind new sockets; on failure close what was bound and keep everything else.
            # A listener that moves to an address another one is leaving is bound after
            # the old one closes (step 4), so it is not bound here.
            leaving = {h.config.listen for name, h in self.listeners.items() if new_handles.get(name) is not h}
            started: list[ListenerHandle] = []
            deferred: list[ListenerHandle] = []
            try:
                for handle in to_start:
                    if handle.config.listen in leaving:
                        deferred.append(handle)
                        continue
                    await handle.start()
                    started.append(handle)
            except OSError:
                for handle in started:
                    handle.stop_accepting()
                raise
            # 3. Swap: one assignment per listener; connections read these per request.
            for config in listeners:
                handle = new_handles[config.name]
                handle.config = config
                handle.table = tables.get(config.name)
                handle.cluster = new_clusters[config.to] if config.to is not None else None
                handle.sql, handle.sql_tls = sql.get(config.name, (None, None))
                handle.source = config.source()
                handle.identify = self.owner_of if self.catalog is not None else None
            for cluster in new_clusters.values():
                self._follow(cluster)
                cluster.start()
            old_clusters, self.clusters = self.clusters, new_clusters
            old_handles, self.listeners = self.listeners, new_handles
            # 4. Retire what is gone: removed listeners drain in the background.
            for name, handle in old_handles.items():
                if new_handles.get(name) is not handle:
                    handle.stop_accepting()
                    if handle.server is not None:
                        await handle.server.wait_closed()
                    task = asyncio.get_running_loop().create_task(
                        handle.drain(time.monotonic() + 30.0), name=f"drain:{name}"
                    )
                    self._background.add(task)
                    task.add_done_callback(self._background_done)
            for handle in deferred:
                await handle.start()
            for name, cluster in old_clusters.items():
                if new_clusters.get(name) is not cluster:
                    unsubscribe = self._following.pop(cluster, None)
                    if unsubscribe is not None:
                        unsubscribe()
                    await cluster.stop()

    def _follow(self, cluster: Cluster) -> None:
        """A cluster naming a service takes its endpoints from every catalog snapshot: the
        usable instances (passing, else warning) that have the named port."""
        service, port = cluster.config.service, cluster.config.port
        if service is None or port is None or cluster in self._following:
            return
        if self.catalog is None:
            log.warning("cluster %s follows service %r, but no registry runs here: no endpoints", cluster.name, service)
            return

        def update(snapshot: Snapshot) -> None:
            cluster.set_endpoints([(i.address, i.ports[port]) for i in snapshot.usable(service) if port in i.ports])

        self._following[cluster] = self.catalog.subscribe(update)

    def _sql_context(
        self, config: ListenerConfig, rules: Mapping[str, PolicyRule], old: ListenerHandle | None
    ) -> tuple[SqlContext, ssl.SSLContext | None]:
        """A SQL listener's counting and policy context. The policy engine (with its token
        buckets) is kept when the listener's rules are unchanged; TLS files are read here, so
        a bad certificate refuses the reload before anything changed."""
        listed = [rules[name] for name in config.policies]
        engine: PolicyEngine | None = None
        if old is not None and old.sql is not None and old.sql.engine is not None and old.sql.rules == listed:
            engine = old.sql.engine
        elif listed:
            engine = PolicyEngine(listed)
        tls: ssl.SSLContext | None = None
        if config.tls is not None and config.tls.cert is not None and config.tls.key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.tls.cert, config.tls.key)
        stats = self.sql_stats
        classifier, classifier_bs = stats.classifiers(config.protocol)
        context = SqlContext(
            listener=config.name,
            metrics=stats,
            classifier=classifier,
            classifier_bs=classifier_bs,
            protocol=config.protocol,
            engine=engine,
            rules=listed,
            identity=config.source(),
            identify=self.owner_of if self.catalog is not None else None,
            tls=tls is not None,
            clock=time.monotonic,
            wallclock=time.time,
        )
        return context, tls

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(h.drain(deadline) for h in self.listeners.values()))

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        await self.drain(0.0)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for unsubscribe in self._following.values():
            unsubscribe()
        self._following.clear()
        for cluster in self.clusters.values():
            await cluster.stop()

    def address_of(self, listener: str) -> tuple[str, int]:
        return self.listeners[listener].address

    def snapshot(self) -> dict[str, object]:
        return {name: c.snapshot() for name, c in self.clusters.items()}
