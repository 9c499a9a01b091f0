"""The process's lifecycle: ordered start, reloads from every source, ordered shutdown.

The supervisor owns the current :class:`Config` and a list of :class:`Component` objects
(admin API first, then the router; later discovery and the scheduler). It starts them in list
order and stops them in reverse, so the admin API answers ``/healthz`` and ``/readyz`` (503)
while the rest starts, and keeps answering while the router drains.

Reloads come from SIGHUP, from a poll of the config file's stat and from ``POST /reload``.
Each one loads and validates the file off to the side; an unchanged config is dropped, an
invalid one is refused with its errors (the running config stays), a valid one is handed to
every component. They run one at a time under a lock, and none runs once shutdown began.

Signals only set events (as uvicorn does); the work happens in tasks the supervisor owns. A
second SIGTERM/SIGINT during the drain stops waiting for in-flight requests.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from discovery.model import Catalog
from pointsman.config import Config, load_file
from pointsman.errors import ConfigError, ConfigProblem
from pointsman.metrics import build_registry
from router.config import ClusterConfig, ListenerConfig, format_address
from router.http_stats import HttpStats
from router.listeners import Router
from router.metrics import RouterStats

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.registry import Collector

log = logging.getLogger("pointsman")

DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_WATCH_INTERVAL = 0.5


class Component(ABC):
    """A long-running part of the process, started, reloaded and stopped by the supervisor.

    Contract: ``reload`` either applies the whole new config or raises and leaves the
    component running its previous one (build off to the side, then swap). ``stop`` stops
    accepting new work, lets work in flight finish until ``deadline`` (a ``time.monotonic()``
    value), then releases everything; it must return soon after the deadline.
    """

    name: str = "component"
    # Where in the config a failure to start or apply points (e.g. a port that is taken).
    config_section: str = ""

    @abstractmethod
    async def start(self, config: Config) -> None: ...

    @abstractmethod
    async def reload(self, config: Config) -> None: ...

    @abstractmethod
    async def stop(self, deadline: float) -> None: ...

    def endpoints(self) -> list[str]:
        """One line per address it serves, logged after start and reload (``listener public
        http 127.0.0.1:8080``): what a user of ``make run`` reads, and what tests parse."""
        return []

    def admin_routes(self) -> list[web.RouteDef]:
        """Routes it adds to the admin API (the router adds ``/clusters``)."""
        return []

    def collectors(self) -> list[Collector]:
        """Prometheus collectors it adds to ``/metrics``."""
        return []


class RouterComponent(Component):
    """The router's listeners and clusters."""

    name = "router"
    config_section = "listeners"

    def __init__(self, stats: RouterStats, catalog: Catalog | None = None) -> None:
        self.router = Router(stats, catalog=catalog)
        self.http_stats = HttpStats(stats)  # sampled below; GET /http/stats reads it
        self._sampler: asyncio.Task[None] | None = None
        self._config: Config | None = None
        # Listeners and clusters made by other components (the scheduler's sidecars), applied
        # together with the config's.
        self._generated: tuple[dict[str, ClusterConfig], list[ListenerConfig]] = ({}, [])
        # One apply at a time, each reading the latest config and generated set: a sidecar
        # change racing a reload must not re-apply the config the reload replaced.
        self._apply_lock = asyncio.Lock()

    async def _apply(self, config: Config) -> None:
        async with self._apply_lock:
            await self._apply_locked(config)

    async def _apply_locked(self, config: Config) -> None:
        clusters, listeners = self._generated
        await self.router.apply({**config.clusters, **clusters}, [*config.listeners, *listeners], config.policies)
        self._config = config

    async def set_generated(self, clusters: dict[str, ClusterConfig], listeners: list[ListenerConfig]) -> None:
        """Replace the generated listeners and clusters (bound before this returns)."""
        async with self._apply_lock:
            previous, self._generated = self._generated, (clusters, listeners)
            if self._config is None:
                return
            try:
                await self._apply_locked(self._config)
            except BaseException:
                self._generated = previous
                raise

    async def start(self, config: Config) -> None:
        await self._apply(config)
        self._sampler = asyncio.get_running_loop().create_task(self._sample(), name="sql-stats-sampler")

    async def _sample(self) -> None:
        """Once a second, a sample of the SQL and HTTP counters: /sql/stats and /http/stats
        give rates from these."""
        while True:
            self.router.sql_stats.sample()
            self.http_stats.sample()
            await asyncio.sleep(1.0)

    async def reload(self, config: Config) -> None:
        # Router.apply binds new sockets before it changes anything, so an OSError (port
        # taken) leaves the running listeners and clusters as they were.
        await self._apply(config)

    async def stop(self, deadline: float) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        try:
            await self.router.drain(max(0.0, deadline - time.monotonic()))
        finally:
            # Also when a second signal cancels the drain: close aborts what is left.
            await self.router.close()

    def endpoints(self) -> list[str]:
        return [
            f"listener {name} {handle.config.protocol} {format_address(handle.address)}"
            for name, handle in self.router.listeners.items()
        ]

    def admin_routes(self) -> list[web.RouteDef]:
        from pointsman.admin import cluster_routes, http_routes, sql_routes

        return [*cluster_routes(self.router), *sql_routes(self.router.sql_stats), *http_routes(self.http_stats)]

    def collectors(self) -> list[Collector]:
        return [self.router.sql_stats]


class State(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ReloadResult:
    status: str  # reloaded | unchanged | refused | stopping | starting
    hash: str  # the digest of the config running after the attempt
    error: ConfigError | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "hash": self.hash}
        if self.error is not None:
            body.update(self.error.as_dict())
        return body


FileSignature = tuple[int, int, int, int]


def file_signature(path: Path) -> FileSignature | None:
    """What changes when a file is edited in place (mtime, size) or replaced by an atomic
    rename or a symlink swap (device, inode). None while the file is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Supervisor:
    """Owns the components, the current config and every background task of the process."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path,
        components: Sequence[Component],
        *,
        stats: RouterStats | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        watch_interval: float | None = DEFAULT_WATCH_INTERVAL,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self.digest = config.digest()
        self.config_path = Path(config_path)
        # Reload counters and the config hash live in RouterStats; one instance for the
        # process, shared with the router component when there is one.
        self.stats = stats if stats is not None else RouterStats()
        self.drain_timeout = drain_timeout
        self.watch_interval = watch_interval
        self.handle_signals = handle_signals
        # Imported here: admin.py builds on Component, defined above.
        from pointsman.admin import AdminServer

        self.admin = AdminServer(self)
        self.components: list[Component] = [self.admin, *components]
        self.registry = build_registry([self.stats, *(c for comp in self.components for c in comp.collectors())])
        self.state = State.CREATED
        self._started: list[Component] = []
        self._stop_requested = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        # The stat of the file as it was when last read, so the watcher reacts to changes
        # only (not to the reload a SIGHUP or the API already did).
        self._file_signature = file_signature(self.config_path)
        self._signals: list[signal.Signals] = []
        # The last reload attempted (source, wall-clock time, result): GET /status shows it.
        self.last_reload: tuple[str, float, ReloadResult] | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start every component in order; on failure stop those started and raise
        :class:`ConfigError` (a port that is taken) or the component's exception."""
        if self.state is not State.CREATED:
            raise RuntimeError(f"supervisor already {self.state.value}")
        self.state = State.STARTING
        if self.handle_signals:
            self._install_signal_handlers()
        self.stats.config_hash = self.digest
        for component in self.components:
            try:
                await component.start(self.config)
            except OSError as exc:
                await self._abort_start()
                problem = ConfigProblem(component.config_section, f"cannot start the {component.name}: {exc}")
                raise ConfigError(str(self.config_path), [problem]) from None
            except BaseException:
                await self._abort_start()
                raise
            self._started.append(component)
        self.state = State.READY
        self._log_endpoints()
        log.info("ready: config %s (hash %s)", self.config_path, self.digest)

    async def _abort_start(self) -> None:
        await self._stop_components(time.monotonic())
        self.state = State.STOPPED
        self._remove_signal_handlers()

    async def run_until_stopped(self) -> int:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down in order.
        Returns the process exit code."""
        if self.state is State.CREATED:
            await self.start()
        if self.state is not State.READY:
            raise RuntimeError(f"cannot run: the supervisor is {self.state.value}")
        exit_code = 0
        try:
            async with asyncio.TaskGroup() as group:
                loops = [group.create_task(self._serve_reload_requests(), name="reload-requests")]
                if self.watch_interval:
                    loops.append(group.create_task(self._watch_config_file(self.watch_interval), name="config-watch"))
                await self._stop_requested.wait()
                self._mark_draining()
                # Stop the reload sources before the drain, so no reload races the shutdown.
                # Under the reload lock: a reload in progress finishes rather than being
                # cancelled half-applied; a loop waiting for the lock has applied nothing.
                async with self._reload_lock:
                    for task in loops:
                        task.cancel()
        except* Exception as group_error:
            # The loops catch their own errors; reaching this is a bug. Still shut down.
            log.error("a background task failed", exc_info=group_error)
            exit_code = 1
        finally:
            await self.shutdown()
        return exit_code

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """Ask for an orderly shutdown; asked twice, stop waiting for in-flight work."""
        what = sig.name if sig is not None else "stop requested"
        if self._stop_requested.is_set():
            log.warning("%s again: closing in-flight connections now", what)
            self._force_stop.set()
            return
        log.info("%s: shutting down (second signal forces)", what)
        self._stop_requested.set()

    def request_reload(self) -> None:
        # Several SIGHUPs before the reload task runs coalesce into one reload.
        self._reload_requested.set()

    async def shutdown(self) -> None:
        """Readiness off, stop components in reverse order within the drain deadline."""
        if self.state in (State.STOPPED, State.CREATED):
            self.state = State.STOPPED
            return
        self._stop_requested.set()
        self._mark_draining()
        # A reload in progress finishes first (they are short); no new one starts now that
        # the state is DRAINING. Otherwise a reload could bind a listener after the drain.
        async with self._reload_lock:
            pass
        await self._stop_components(time.monotonic() + self.drain_timeout)
        self.state = State.STOPPED
        self._remove_signal_handlers()
        log.info("stopped")

    def _mark_draining(self) -> None:
        if self.state is not State.DRAINING:
            self.state = State.DRAINING  # /readyz answers 503 from here on; reloads are refused
            log.info("draining: waiting up to %.1fs for in-flight requests", self.drain_timeout)

    async def _stop_components(self, deadline: float) -> None:
        """Stop in reverse start order. A forced stop (second signal) cancels the component
        stopping at that moment; the ones after it stop with a deadline of now, and are
        awaited: with nothing left to wait for, they only release their sockets."""
        while self._started:
            component = self._started.pop()
            if self._force_stop.is_set():
                deadline = time.monotonic()
            stopping = asyncio.create_task(component.stop(deadline), name=f"stop:{component.name}")
            waiting: list[asyncio.Task[Any]] = [stopping]
            if not self._force_stop.is_set():
                waiting.append(asyncio.create_task(self._force_stop.wait(), name="force-stop"))
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waiting:
                    if not task.done():
                        if task is stopping:
                            log.warning("%s: stop forced", component.name)
                        task.cancel()
                outcome = (await asyncio.gather(*waiting, return_exceptions=True))[0]
            if isinstance(outcome, Exception):
                log.error("%s: error while stopping", component.name, exc_info=outcome)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
            self._signals.append(sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._signals.append(signal.SIGHUP)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        while self._signals:
            loop.remove_signal_handler(self._signals.pop())

    def _log_endpoints(self) -> None:
        for component in self._started:
            for line in component.endpoints():
                log.info("%s", line)

    # -- reloads ------------------------------------------------------------------------

    async def reload(self, source: str) -> ReloadResult:
        """Load the config file again and apply it if it is valid and different."""
        result = await self._reload(source)
        if result.status in ("reloaded", "unchanged", "refused"):  # not one ignored while starting/stopping
            self.last_reload = (source, time.time(), result)
        return result

    async def _reload(self, source: str) -> ReloadResult:
        async with self._reload_lock:
            if self.state is not State.READY:
                status = "starting" if self.state in (State.CREATED, State.STARTING) else "stopping"
                log.warning("reload (%s) ignored: %s", source, status)
                return ReloadResult(status, self.digest)
            # Stat before reading: if the file changes in between, the watcher sees a
            # difference and reloads once more (a no-op at worst), rather than missing it.
            self._file_signature = file_signature(self.config_path)
            try:
                # Parsing and validating off the event loop: the data plane keeps serving.
                new = await asyncio.to_thread(load_file, self.config_path)
            except ConfigError as exc:
                return self._refuse(source, exc)
            digest = new.digest()
            if digest == self.digest:
                self.stats.reloads.inc(("unchanged",))
                log.info("reload (%s): config unchanged (hash %s)", source, digest)
                return ReloadResult("unchanged", digest)
            applied: list[Component] = []
            for component in self._started:
                try:
                    await component.reload(new)
                except Exception as exc:
                    if not isinstance(exc, OSError):
                        log.error("%s: reload failed", component.name, exc_info=exc)
                    await self._roll_back(applied)
                    problem = ConfigProblem(component.config_section, f"cannot apply to the {component.name}: {exc}")
                    return self._refuse(source, ConfigError(str(self.config_path), [problem]))
                applied.append(component)
            old_digest, self.config, self.digest = self.digest, new, digest
            self.stats.reloads.inc(("success",))
            self.stats.config_hash = digest
            log.info("reload (%s): config %s -> %s", source, old_digest, digest)
            self._log_endpoints()
            return ReloadResult("reloaded", digest)

    async def _roll_back(self, applied: list[Component]) -> None:
        """Components before the one that failed go back to the running config."""
        for component in reversed(applied):
            try:
                await component.reload(self.config)
            except Exception:
                log.exception("%s: could not return to the running config", component.name)

    def _refuse(self, source: str, error: ConfigError) -> ReloadResult:
        self.stats.reload_failures.inc(())
        self.stats.reloads.inc(("failure",))
        log.error("reload (%s) refused, still running hash %s:\n%s", source, self.digest, error.render())
        return ReloadResult("refused", self.digest, error)

    async def _serve_reload_requests(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload("SIGHUP")
            except Exception:
                log.exception("reload after SIGHUP failed")

    async def _watch_config_file(self, interval: float) -> None:
        """Poll the file's stat; reload once a change has held still for one poll.

        Polling (not inotify) catches in-place edits, atomic renames and symlink swaps
        (Kubernetes ConfigMaps) alike, with no dependency. The one-poll debounce lets an
        editor finish writing: a file seen half-written would be refused, then picked up on
        the next change only.
        """
        seen = self._file_signature
        while True:
            await asyncio.sleep(interval)
            current = file_signature(self.config_path)
            if current is None or current == self._file_signature:
                # Missing (between unlink and rename, say) or as last read: nothing to do.
                seen = current
                continue
            if current != seen:
                seen = current
                continue
            try:
                await self.reload("file change")
            except Exception:
                log.exception("reload after a file change failed")


def build_supervisor(
    config: Config,
    config_path: str | Path,
    *,
    router: bool = True,
    discovery: bool | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    watch_interval: float | None = DEFAULT_WATCH_INTERVAL,
    handle_signals: bool = True,
) -> Supervisor:
    """The supervisor for a command: which components it runs is the command's choice
    (``up`` runs everything the file configures, ``router`` the router only, ``dns`` the
    registry and DNS only). ``discovery=None``: when the config has a discovery section, or
    declares jobs (the scheduler keeps its allocations in the registry's store).

    Order: store, registry and DNS -> router -> scheduler; stopped in reverse, so instances
    are deregistered and stopped while the router still drains them, and the router's
    clusters that follow a service read the catalog until the end."""
    stats = RouterStats()
    components: list[Component] = []
    catalog: Catalog | None = None
    from pointsman.scheduler_component import wants_scheduler

    scheduler = router and discovery is None and wants_scheduler(config)
    if discovery is None:
        discovery = config.discovery is not None or scheduler
    discovery_component = None
    if discovery:
        from pointsman.discovery_component import DiscoveryComponent

        catalog = Catalog()
        discovery_component = DiscoveryComponent(catalog)
        components.append(discovery_component)
    if router:
        components.append(RouterComponent(stats, catalog))
    if scheduler and discovery_component is not None:
        from pointsman.scheduler_component import SchedulerComponent

        router_component = next((c for c in components if isinstance(c, RouterComponent)), None)
        components.append(SchedulerComponent(discovery_component, router_component, Path(config_path)))
    return Supervisor(
        config,
        config_path,
        components,
        stats=stats,
        drain_timeout=drain_timeout,
        watch_interval=watch_interval,
        handle_signals=handle_signals,
    )
