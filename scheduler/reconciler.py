"""The reconciler: keeps what runs equal to what is declared, and tells discovery about it.

Desired state: jobs (from the config file and the admin API) and nodes (status from the config,
overridden at run time by a drain). Actual state: allocations, persisted in the store under
``scheduler/allocs/<id>``, and the tasks the drivers report. ``reconcile()`` compares them and
acts; it runs every ``interval`` and on every event (a task ended, an instance's health changed,
a job or a node changed)::

    job removed, count lowered       -> stop the extra allocations
    allocation misfit                -> stop it, place a replacement (node down, draining or
      (scheduler.plan.check_allocations)  gone, a constraint that no longer holds, ...)
    an index with no live allocation -> place (feasibility + ranking) and start
    a new version                    -> rolling update, `update.max_parallel` at a time: start
                                        the new instance, wait until it is healthy for
                                        `update.healthy_for`, then stop the old one
    restart attempts used up         -> the allocation fails; a replacement is placed after a
                                        backoff (it may land elsewhere)

Each allocation has one runner task: start -> register -> wait -> restart with backoff
(`restart.delay` doubling up to `restart.max_delay`; more than `restart.attempts` restarts within
`restart.interval` fail the allocation, as Nomad's restart stanza does). Health comes from the
registry, whose checks probe every registered instance: an instance is registered, with the
job's check, as soon as its task runs, and turns passing when the check passes (DNS and the
router send traffic only to passing instances). One whose checks fail for
`health.unhealthy_after` intervals after `health.grace` is restarted. Before a task is stopped
its instance is deregistered and `shutdown_delay` passes, so the router drains it first.

Restart of pointsman: the allocation records are read back from the store, tasks that are still
alive (the drivers' own records: pid + start time, container labels) are adopted instead of
started again, tasks of ours that no record wants are stopped (orphans), and registrations of
allocations that are gone are removed. A graceful stop of pointsman stops the tasks and keeps
the records, so the next start brings the same allocations (ids, nodes, ports) back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from discovery.registry import Registry
from discovery.store import Store
from scheduler.config import JobConfig, NodeConfig, effective_nodes
from scheduler.driver import Driver, DriverError, TaskExit, TaskHandle
from scheduler.model import PORT_RANGE, Allocation, Job, Node, Resources
from scheduler.plan import check_allocations, place_into, placement_order
from scheduler.records import ALLOCS, JOBS, Alloc, JobEntry, Sidecar, Unplaced
from scheduler.registration import registration
from scheduler.state import ClusterState
from scheduler.taskspec import task_spec
from units import format_duration

log = logging.getLogger("pointsman.scheduler")

# After an event, wait this long for more before reconciling (a burst of catalog changes).
DEBOUNCE = 0.05
# Ended allocations kept for `GET /allocations` (the store keeps live ones only).
HISTORY = 100


def listening_ports(paths: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")) -> frozenset[int]:
    """TCP ports something listens on in this network namespace (state 0A), from /proc."""
    ports: set[int] = set()
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return frozenset(ports)


class Reconciler:
    """Owns the allocations of this process: plans, starts, watches, restarts and stops them."""

    def __init__(
        self,
        store: Store,
        registry: Registry | None,
        drivers: Mapping[str, Driver],
        *,
        algorithm: Literal["binpack", "spread"] = "binpack",
        interval: float = 1.0,
        port_range: tuple[int, int] = PORT_RANGE,
        prepare_network: Callable[[str], Awaitable[str | None]] | None = None,
        sidecars_changed: Callable[[Sequence[Sidecar]], Awaitable[None]] | None = None,
        variables: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.registry = registry
        self.drivers = dict(drivers)
        self.algorithm = algorithm
        self.interval = interval
        self.port_range = port_range
        # Called before a task that needs it starts (a namespaced process, a container): makes
        # the bridge and a DNS server its instances can reach; returns that DNS address.
        self.prepare_network = prepare_network
        # Called with every allocation's sidecars whenever they change (the router listens).
        self.sidecars_changed = sidecars_changed
        self.sidecars: dict[str, tuple[Sidecar, ...]] = {}
        # ${CONFIG_DIR}, ${STATE_DIR}: resolved here, before the driver expands the rest.
        self.variables = dict(variables or {})
        self.clock = clock
        self.jobs: dict[str, JobEntry] = {}
        self.node_configs: list[NodeConfig] = effective_nodes(None)
        self.node_status: dict[str, str] = {}  # run-time overrides (drain), by node name
        self.driver_ok: dict[str, tuple[bool, str]] = {}
        self.allocs: dict[str, Alloc] = {}
        self.unplaced: dict[str, Unplaced] = {}
        self.reschedule: dict[tuple[str, int], tuple[int, float]] = {}  # (job, index) -> (tries, not before)
        self.placements = 0
        self.history: collections.deque[Alloc] = collections.deque(maxlen=HISTORY)  # ended allocations, newest last
        self.restarts_total: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._unsubscribe: Callable[[], None] | None = None
        self._evals = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, nodes: Sequence[NodeConfig] | None, jobs: Sequence[JobConfig]) -> None:
        """Read the store, adopt what still runs, clean up orphans, then reconcile in a loop."""
        for name, driver in self.drivers.items():
            self.driver_ok[name] = await driver.available()
            if not self.driver_ok[name][0]:
                log.warning("driver %s unavailable: %s", name, self.driver_ok[name][1])
        self.node_configs = effective_nodes(nodes)
        for kv in (await self.store.list(JOBS))[0]:
            try:
                config = JobConfig.model_validate_json(kv.value)
            except ValueError as exc:
                log.warning("scheduler: ignoring unreadable job %s: %s", kv.key, exc)
                continue
            self.jobs[config.name] = JobEntry(config, "api")
        for config in jobs:
            self.jobs[config.name] = JobEntry(config, "config")
        for kv in (await self.store.list(ALLOCS))[0]:
            try:
                alloc = Alloc.from_json(kv.value)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("scheduler: ignoring unreadable allocation %s: %s", kv.key, exc)
                continue
            if alloc.desired == "run":
                self.allocs[alloc.id] = alloc
            else:
                await self.store.delete(kv.key)
        await self._adopt()
        if self.registry is not None:
            self._unsubscribe = self.registry.catalog.subscribe(lambda _snapshot: self.wake())
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler-reconcile")

    async def _adopt(self) -> None:
        alive: dict[str, tuple[Driver, TaskHandle]] = {}
        for name, driver in self.drivers.items():
            if not self.driver_ok.get(name, (False, ""))[0]:
                continue
            for handle in await driver.running():
                alive[handle.alloc_id] = (driver, handle)
        for alloc in self.allocs.values():
            found = alive.get(alloc.id)
            if found is not None:
                log.info("adopted %s (%s %s) on %s", alloc.id, found[1].driver, found[1].ref, alloc.node)
                alloc.message = "adopted after a restart of pointsman"
                self._spawn(alloc, found[1])
            else:
                if alloc.status in ("running", "starting") and alloc.handle is not None:
                    alloc.last_exit = "not running when pointsman started"
                self._spawn(alloc, None)
        keep = set(self.allocs)
        for name, driver in self.drivers.items():
            if self.driver_ok.get(name, (False, ""))[0]:
                for orphan in await driver.cleanup(keep):
                    log.info("stopped orphaned %s task %s", name, orphan)
        if self.registry is not None:
            for reg in list(self.registry.registrations().values()):
                if reg.source == "scheduler" and reg.id not in keep:
                    await self.registry.deregister(reg.service, reg.id)

    async def close(self) -> None:
        """Stop the loop, then every task (deregistered first); the records stay for the next start."""
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        runners = []
        for alloc in self.allocs.values():
            if alloc.runner is not None and not alloc.runner.done():
                alloc.kick_reason = "pointsman stopping"
                alloc.kick.set()
                runners.append(alloc.runner)
        await asyncio.gather(*runners, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            await asyncio.sleep(DEBOUNCE)
            self._wake.clear()

    # -- desired state -----------------------------------------------------------------------

    async def set_declared(self, nodes: Sequence[NodeConfig] | None, jobs: Sequence[JobConfig]) -> None:
        """The config file's nodes and jobs (start and reload); API jobs stay."""
        self.node_configs = effective_nodes(nodes)
        declared = {job.name for job in jobs}
        for name, entry in list(self.jobs.items()):
            if entry.source == "config" and name not in declared:
                del self.jobs[name]
        for config in jobs:
            self.jobs[config.name] = JobEntry(config, "config")
        self.wake()

    async def submit(self, config: JobConfig) -> None:
        """Add or replace a job through the API (persisted; a config-declared job is refused by the caller)."""
        await self.store.put(JOBS + config.name, config.model_dump_json().encode())
        self.jobs[config.name] = JobEntry(config, "api")
        self.wake()

    async def remove(self, name: str) -> bool:
        entry = self.jobs.get(name)
        if entry is None or entry.source != "api":
            return False
        del self.jobs[name]
        await self.store.delete(JOBS + name)
        self.wake()
        return True

    def set_node_status(self, name: str, status: str | None) -> None:
        """Drain (`draining`), mark lost (`down`) or return (`None`: as the config says) a node."""
        if status is None:
            self.node_status.pop(name, None)
        else:
            self.node_status[name] = status
        self.wake()

    def nodes(self) -> list[Node]:
        """The declared nodes as placement sees them: the drivers this host really has, the
        run-time status, and - every node's tasks run on this host - the host's listening ports
        reserved, so that a port some other program holds is never handed to an instance."""
        busy = listening_ports()
        out = []
        for config in self.node_configs:
            node = config.to_node()
            drivers = frozenset(d for d in node.drivers if self.driver_ok.get(d, (False, ""))[0])
            status = self.node_status.get(node.name, node.status)
            reserved = node.reserved_ports | busy
            out.append(Node(node.name, node.capacity, node.attributes, drivers, reserved, status))  # type: ignore[arg-type]
        return out

    # -- reconcile ---------------------------------------------------------------------------

    def live(self) -> list[Alloc]:
        return [a for a in self.allocs.values() if a.desired == "run"]

    async def reconcile(self) -> None:
        if self._closing:
            return
        async with self._lock:
            now = self.clock()
            self._observe_health(now)
            nodes = self.nodes()
            jobs = {name: entry.config for name, entry in self.jobs.items()}
            for alloc in self.live():
                if alloc.job not in jobs:
                    await self._stop(alloc, "job removed")
            specs = {name: config.to_job() for name, config in jobs.items()}
            for misfit in check_allocations(nodes, [a.allocation() for a in self.live()], list(specs.values())):
                alloc = self.allocs[misfit.alloc.id]
                log.info("%s: %s; placing a replacement", alloc.id, misfit.reason)
                await self._stop(alloc, misfit.reason)
            state = ClusterState(nodes, [a.allocation() for a in self.live()], self.port_range)
            self._evals += 1
            eval_id = f"{time.time_ns():x}-{self._evals}"
            for job in placement_order(list(specs.values())):
                await self._reconcile_job(state, job, jobs[job.name], now, eval_id)

    async def _reconcile_job(self, state: ClusterState, job: Job, config: JobConfig, now: float, eval_id: str) -> None:
        mine = [a for a in self.live() if a.job == job.name]
        current = {a.index: a for a in mine if a.version == job.version}
        old: dict[int, Alloc] = {}
        for alloc in mine:
            if alloc.version == job.version:
                continue
            if alloc.index >= job.count or alloc.index in old:
                await self._stop(alloc, "scaled down" if alloc.index >= job.count else "duplicate index")
            else:
                old[alloc.index] = alloc
        for index, alloc in sorted(current.items(), reverse=True):
            if index >= job.count:
                await self._stop(alloc, "scaled down")
                del current[index]
        # Rolling update: an old instance goes once its replacement has been healthy long enough.
        in_flight = 0
        for index, alloc in current.items():
            if index in old:
                if self._stable(alloc, config, now):
                    await self._stop(old.pop(index), f"replaced by version {job.version}")
                else:
                    in_flight += 1
        missing = [k for k in range(job.count) if k not in current and self._may_place(job.name, k, now)]
        fresh = [k for k in missing if k not in old]
        updates = [k for k in missing if k in old][: max(0, config.update.max_parallel - in_flight)]
        wanted = fresh + updates
        if not wanted:
            if not [k for k in range(job.count) if k not in current]:
                self.unplaced.pop(job.name, None)
            return
        for k in range(job.count):
            if k not in wanted and (job.name, job.version, k) not in state.allocated:
                # Not this round (rolling update, backoff): mark the index taken, on no node.
                state.commit(Allocation("", job.name, job.version, "", k, Resources()))
        plan = place_into(state, job, algorithm=self.algorithm, eval_id=eval_id)
        for placed in plan.placements:
            alloc = Alloc(
                id=placed.id,
                job=job.name,
                version=job.version,
                node=placed.node,
                index=placed.index,
                cpu=placed.resources.cpu,
                memory=placed.resources.memory,
                ports=dict(placed.ports),
                spec=config.model_dump(mode="json"),
                eval_id=eval_id,
                message=f"placed on {placed.node}"
                + (f", replacing version {old[placed.index].version}" if placed.index in old else ""),
            )
            self.allocs[alloc.id] = alloc
            self.placements += 1
            await self._persist(alloc)
            log.info("placed %s on %s (ports %s)", alloc.id, alloc.node, alloc.ports or "-")
            self._spawn(alloc, None)
        if plan.failures:
            explanation = "; ".join(sorted({failure.explain() for failure in plan.failures}))
            previous = self.unplaced.get(job.name)
            self.unplaced[job.name] = Unplaced(len(plan.failures), explanation)
            if previous is None or previous.explanation != explanation:
                log.warning("job %s: %d instance(s) cannot be placed: %s", job.name, len(plan.failures), explanation)
        else:
            self.unplaced.pop(job.name, None)

    def _may_place(self, job: str, index: int, now: float) -> bool:
        entry = self.reschedule.get((job, index))
        return entry is None or now >= entry[1]

    def _stable(self, alloc: Alloc, config: JobConfig, now: float) -> bool:
        """Healthy (or, without a check, running) for `update.healthy_for`."""
        if alloc.status != "running":
            return False
        since = alloc.healthy_since if config.health is not None else alloc.run_started
        return since is not None and now - since >= config.update.healthy_for

    def _observe_health(self, now: float) -> None:
        if self.registry is None:
            return
        for alloc in self.live():
            if alloc.status != "running" or not alloc.registered:
                continue
            health = self.registry.health_of_instance(alloc.job, alloc.id)
            if health != alloc.health:
                alloc.health = health
                alloc.healthy_since = now if health == "passing" else None
                alloc.unhealthy_since = now if health == "critical" else None
            config = alloc.config
            if self._stable(alloc, config, now):
                self.reschedule.pop((alloc.job, alloc.index), None)
            check = config.health
            if check is None or alloc.unhealthy_since is None or alloc.run_started is None:
                continue
            grace_over = now - alloc.run_started >= check.grace
            failing_for = now - max(alloc.unhealthy_since, alloc.run_started + check.grace)
            if grace_over and failing_for >= check.unhealthy_after * check.interval and not alloc.kick.is_set():
                alloc.kick_reason = f"health check failing for {failing_for:.1f}s"
                log.warning("%s: %s; restarting it", alloc.id, alloc.kick_reason)
                alloc.kick.set()

    # -- one allocation ----------------------------------------------------------------------

    def _spawn(self, alloc: Alloc, adopted: TaskHandle | None) -> None:
        alloc.runner = asyncio.get_running_loop().create_task(self._run(alloc, adopted), name=f"alloc:{alloc.id}")

    async def _stop(self, alloc: Alloc, reason: str) -> None:
        """Mark the allocation stopped; its runner deregisters, drains and stops the task."""
        if alloc.desired == "stop":
            return
        alloc.desired = "stop"
        alloc.message = reason
        alloc.kick_reason = reason
        log.info("%s: stopping: %s", alloc.id, reason)
        await self._persist(alloc)
        alloc.kick.set()

    async def _persist(self, alloc: Alloc) -> None:
        if alloc.desired == "stop" and alloc.status in ("stopped", "failed", "lost"):
            await self.store.delete(ALLOCS + alloc.id)
        else:
            await self.store.put(ALLOCS + alloc.id, alloc.to_json())

    async def _run(self, alloc: Alloc, handle: TaskHandle | None) -> None:
        try:
            await self._run_until_stopped(alloc, handle)
        except Exception:
            log.exception("%s: runner failed", alloc.id)
            alloc.status = "failed"
            alloc.desired = "stop"
            with contextlib.suppress(Exception):
                await self._deregister(alloc)
                await self._persist(alloc)
        finally:
            self.wake()

    async def _run_until_stopped(self, alloc: Alloc, handle: TaskHandle | None) -> None:
        config = alloc.config
        driver = self.drivers.get(config.driver)
        while alloc.desired == "run" and not self._closing:
            task_exit: TaskExit | None = None
            if driver is None:
                reason = f"driver {config.driver} is not configured"
            elif handle is None:
                alloc.status = "starting"
                try:
                    dns = await self._network_for(config)
                    await self._set_sidecars(alloc, config)
                    snapshot = self.registry.snapshot if self.registry is not None else None
                    spec = task_spec(alloc, config, self.variables, snapshot, dns)
                    handle = await driver.start(spec)
                    reason = ""
                except DriverError as exc:
                    reason = f"start failed: {exc}"
            if driver is not None and handle is not None:
                alloc.handle = asdict(handle)
                alloc.address = getattr(handle, "address", None) or "127.0.0.1"
                alloc.status = "running"
                alloc.run_started = self.clock()
                await self._persist(alloc)
                await self._register(alloc, config)
                self.wake()
                task_exit = await self._wait(alloc, driver, handle, config)
                reason = task_exit.reason
                handle = None
                alloc.handle = None
            await self._deregister(alloc)
            alloc.health = None
            alloc.healthy_since = alloc.unhealthy_since = None
            alloc.last_exit = reason
            if alloc.desired != "run" or self._closing:
                break
            kicked = alloc.kick.is_set()
            alloc.kick.clear()
            alloc.restarts += 1
            now = self.clock()
            window = config.restart.interval
            alloc.restart_times = [t for t in alloc.restart_times if now - t < window] + [now]
            failures = len(alloc.restart_times)
            self.restarts_total[alloc.job] = self.restarts_total.get(alloc.job, 0) + 1
            if failures > config.restart.attempts:
                alloc.status = "failed"
                alloc.desired = "stop"
                within = format_duration(window)
                alloc.message = f"failed after {config.restart.attempts} restarts within {within}: {reason}"
                log.warning("%s: %s", alloc.id, alloc.message)
                self._backoff_index(alloc, config)
                await self._persist(alloc)
                self._retire(alloc)
                return
            delay = 0.0 if kicked else min(config.restart.delay * 2 ** (failures - 1), config.restart.max_delay)
            alloc.status = "restarting"
            alloc.message = f"{reason}; restart {failures} of {config.restart.attempts} in {format_duration(delay)}"
            log.info("%s: %s", alloc.id, alloc.message)
            await self._persist(alloc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await alloc.kick.wait()
            alloc.kick.clear()
        if self._closing and alloc.desired == "run":
            alloc.status = "stopped"
            alloc.message = "stopped with pointsman; restarted on its next start"
            await self.store.put(ALLOCS + alloc.id, alloc.to_json())
            return
        alloc.status = "failed" if alloc.status == "failed" else "stopped"
        await self._persist(alloc)
        self._retire(alloc)

    def _retire(self, alloc: Alloc) -> None:
        self.allocs.pop(alloc.id, None)
        self.history.append(alloc)
        if self.sidecars.pop(alloc.id, None) and self.sidecars_changed is not None:
            task = asyncio.get_running_loop().create_task(self._publish_sidecars(), name="sidecars")
            task.add_done_callback(_log_failure)

    async def _set_sidecars(self, alloc: Alloc, config: JobConfig) -> None:
        """The allocation's local listeners, up before its task starts (the app connects at once)."""
        wanted = tuple(
            Sidecar(
                alloc.id,
                alloc.job,
                alloc.version,
                alloc.node,
                u.service,
                u.port or self._first_port(u.service),
                u.protocol,
                alloc.ports[u.port_name],
                tuple(u.policies),
            )
            for u in config.upstreams
        )
        if self.sidecars.get(alloc.id, ()) == wanted:
            return
        self.sidecars[alloc.id] = wanted
        try:
            await self._publish_sidecars()
        except Exception as exc:
            raise DriverError(f"sidecars of {alloc.id}: {exc}") from exc

    def _first_port(self, service: str) -> str:
        entry = self.jobs.get(service)
        if entry is None or not entry.config.ports:
            raise DriverError(f"upstream {service}: no port given and no job {service} with ports")
        return entry.config.ports[0]

    async def _publish_sidecars(self) -> None:
        if self.sidecars_changed is not None:
            await self.sidecars_changed([s for group in self.sidecars.values() for s in group])

    def _backoff_index(self, alloc: Alloc, config: JobConfig) -> None:
        key = (alloc.job, alloc.index)
        tries = self.reschedule.get(key, (0, 0.0))[0] + 1
        delay = min(config.restart.delay * 2**tries, config.restart.max_delay)
        self.reschedule[key] = (tries, self.clock() + delay)

    async def _wait(self, alloc: Alloc, driver: Driver, handle: TaskHandle, config: JobConfig) -> TaskExit:
        """The task's end, or - when kicked (stop, restart, pointsman stopping) - deregister, drain, stop."""
        waiter = asyncio.ensure_future(driver.wait(handle))
        kicked = asyncio.ensure_future(alloc.kick.wait())
        try:
            await asyncio.wait({waiter, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
        if waiter.done():
            return waiter.result()
        was_serving = alloc.registered and alloc.health == "passing"
        await self._deregister(alloc)
        alloc.status = "stopping"
        if was_serving:
            await asyncio.sleep(config.shutdown_delay)
        task_exit = await driver.stop(handle, config.kill_timeout)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        reason = f"{alloc.kick_reason} ({task_exit.reason})"
        return TaskExit(task_exit.alloc_id, task_exit.code, task_exit.signal, task_exit.at, reason)

    async def _network_for(self, config: JobConfig) -> str | None:
        """The internal DNS address a namespaced process or a container resolves with."""
        if self.prepare_network is None or (config.driver == "process" and config.network == "host"):
            return None
        try:
            return await self.prepare_network(config.driver)
        except DriverError:
            if config.driver == "process":
                raise  # a namespace was asked for and cannot be made
            log.warning("containers of %s will not resolve internal names", config.name, exc_info=True)
            return None

    # -- discovery feed ----------------------------------------------------------------------

    async def _register(self, alloc: Alloc, config: JobConfig) -> None:
        if self.registry is None:
            return
        await self.registry.register(registration(alloc, config))
        alloc.registered = True

    async def _deregister(self, alloc: Alloc) -> None:
        if self.registry is None or not alloc.registered:
            return
        alloc.registered = False
        await self.registry.deregister(alloc.job, alloc.id)

    # -- reads (the API's views of these records are in scheduler/api.py) --------------------

    def log_paths(self, alloc: Alloc) -> tuple[Path, Path] | None:
        """The stdout and stderr files of the allocation's task (None if its driver is not here)."""
        driver = self.drivers.get(alloc.config.driver)
        return None if driver is None else driver.log_paths(alloc.id)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("updating sidecars failed", exc_info=task.exception())
