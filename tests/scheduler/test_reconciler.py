"""The reconciler against real processes, the real SQLite store and the registry's real checks.

Every job here runs a real HTTP server (`python3 -m http.server` on its allocated port); health
comes from the registry's HTTP checks against it. Timings are shortened (checks every 0.1-0.2 s,
restart delays of 0.05-0.1 s) so that each scenario takes a second or two.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.registry import Registry
from discovery.store_sqlite import SqliteStore
from scheduler.api import describe_allocs, describe_jobs
from scheduler.config import JobConfig, NodeConfig
from scheduler.drivers.process import ProcessDriver, proc_starttime
from scheduler.reconciler import Reconciler
from scheduler.records import ALLOCS, Alloc
from tests.support import wait_until

# Ports of this test run: runs side by side (two checkouts, a helper's run) never share one.
PORTS = (20000 + os.getpid() % 40 * 250, 20000 + os.getpid() % 40 * 250 + 249)
HTTP_SERVER = [sys.executable, "-m", "http.server", "${PORT_HTTP}", "--bind", "127.0.0.1"]


def job(name: str = "web", **extra: Any) -> JobConfig:
    data: dict[str, Any] = {
        "name": name,
        "command": HTTP_SERVER,
        "count": 2,
        "ports": ["http"],
        "resources": {"cpu": 0.1, "memory": "32Mi"},
        "health": {"http": "/", "port": "http", "interval": "0.1s", "timeout": "1s", "grace": "3s"},
        "restart": {"attempts": 3, "delay": "0.05s", "max_delay": "0.2s"},
        "update": {"max_parallel": 1, "healthy_for": "0.3s"},
        "shutdown_delay": "0.1s",
        "kill_timeout": "2s",
    }
    data.update(extra)
    return JobConfig.model_validate(data)


def nodes(*names: str, **attributes: dict[str, str]) -> list[NodeConfig]:
    return [
        NodeConfig.model_validate(
            {"name": n, "capacity": {"cpu": 4, "memory": "4Gi"}, "attributes": attributes.get(n, {})}
        )
        for n in names
    ]


class Platform:
    """A store, a registry and a process driver in `tmp`; reconcilers made on them share state."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = SqliteStore(str(tmp / "registry.db"))
        self.registry = Registry(self.store)
        self.driver = ProcessDriver(tmp / "process")
        self.reconcilers: list[Reconciler] = []

    async def start(self) -> None:
        await self.store.start()
        await self.registry.start()

    async def reconciler(self, node_list: list[NodeConfig] | None, jobs: list[JobConfig]) -> Reconciler:
        r = Reconciler(self.store, self.registry, {"process": self.driver}, interval=0.1, port_range=PORTS)
        await r.start(node_list, jobs)
        self.reconcilers.append(r)
        return r

    def passing(self, service: str = "web") -> list[str]:
        return sorted(i.id for i in self.registry.snapshot.instances(service) if i.health == "passing")

    async def close(self) -> None:
        for r in self.reconcilers:
            await r.close()
        await self.driver.cleanup(set())
        await self.registry.close()
        await self.store.close()


@asynccontextmanager
async def platform(tmp: Path) -> AsyncIterator[Platform]:
    p = Platform(tmp)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def running(r: Reconciler, job_name: str = "web") -> list[Alloc]:
    return sorted((a for a in r.live() if a.job == job_name and a.status == "running"), key=lambda a: a.index)


def pid_of(alloc: Alloc) -> int:
    assert alloc.handle is not None
    return int(str(alloc.handle["ref"]).split(":")[0])


async def get(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as response:
        return response.status


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    await wait_until(predicate, timeout=timeout, what=what)


async def test_instances_start_register_and_turn_passing(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(None, [job()])
        await until(lambda: len(p.passing()) == 2, "two passing instances")
        allocs = running(r)
        assert [a.index for a in allocs] == [0, 1]
        assert len({a.ports["http"] for a in allocs}) == 2
        for alloc in allocs:
            assert await get(alloc.ports["http"]) == 200
            instance = next(i for i in p.registry.snapshot.instances("web") if i.id == alloc.id)
            assert (instance.address, instance.ports["http"], instance.node, instance.version) == (
                "127.0.0.1",
                alloc.ports["http"],
                "local",
                "1",
            )
        # The allocations are in the store, for the next start.
        kvs, _ = await p.store.list(ALLOCS)
        assert sorted(kv.key.removeprefix(ALLOCS) for kv in kvs) == sorted(a.id for a in allocs)


async def test_a_killed_instance_is_restarted_in_place_and_reregistered(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(None, [job()])
        await until(lambda: len(p.passing()) == 2, "two passing instances")
        victim = running(r)[0]
        os.kill(pid_of(victim), signal.SIGKILL)
        await until(lambda: victim.id not in p.passing(), "the killed instance leaves the catalog", 3)
        await until(lambda: victim.restarts == 1 and victim.id in p.passing(), "restarted and passing again")
        assert "signal 9" in victim.last_exit
        assert victim.id in {a.id for a in running(r)}  # same allocation: same id, node and port
        assert await get(victim.ports["http"]) == 200
        assert r.restarts_total["web"] == 1


async def test_crash_loop_fails_the_allocation_and_places_a_replacement(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        crash = job(
            "crash",
            command=[sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
            count=1,
            health=None,
            restart={"attempts": 2, "delay": "0.02s", "max_delay": "0.05s"},
        )
        r = await p.reconciler(None, [crash])
        await until(lambda: bool(r.allocs), "placed")
        first = next(iter(r.allocs.values()))
        await until(lambda: first.status == "failed", "the first allocation fails")
        assert first.restarts == 3
        assert "exited 3" in first.last_exit
        assert first.message.startswith("failed after 2 restarts within 300s")
        # A replacement (a new allocation for index 0) is placed after a backoff.
        await until(lambda: any(a.id != first.id and a.index == 0 for a in r.allocs.values()), "a replacement")
        ended = [a["id"] for a in describe_allocs(r, "crash", ended=True) if a["status"] == "failed"]
        assert first.id in ended
        _, stderr = r.log_paths(first) or (None, None)
        assert stderr is not None and "boom" in stderr.read_text()


async def test_an_instance_failing_its_health_check_is_restarted(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        sick = job(
            count=1,
            health={"http": "/missing", "port": "http", "interval": "0.1s", "grace": "0.3s", "unhealthy_after": 3},
        )
        r = await p.reconciler(None, [sick])
        await until(lambda: bool(running(r)), "started")
        alloc = running(r)[0]
        await until(lambda: "web" in p.registry.snapshot.services, "registered")
        assert p.passing() == []  # registered, but a 404 never passes: no traffic for it
        assert [i.health for i in p.registry.snapshot.services["web"]] == ["critical"]
        await until(lambda: alloc.restarts >= 1, "restarted for failing health", 5)
        assert "health check failing" in alloc.last_exit


async def test_scale_up_and_down(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(None, [job(count=1)])
        await until(lambda: len(p.passing()) == 1, "one instance")
        await r.set_declared(None, [job(count=3)])
        await until(lambda: len(p.passing()) == 3, "three instances")
        await r.set_declared(None, [job(count=1)])
        await until(lambda: len(r.live()) == 1 and len(p.passing()) == 1, "back to one")
        assert running(r)[0].index == 0


async def test_rolling_update_keeps_count_passing_throughout(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(None, [job(count=2)])
        await until(lambda: len(p.passing()) == 2, "version 1 up")
        low = []

        def watch(snapshot: Any) -> None:
            low.append(sum(1 for i in snapshot.instances("web") if i.health == "passing"))

        unsubscribe = p.registry.catalog.subscribe(watch)
        await r.set_declared(None, [job(count=2, version="2")])
        await until(
            lambda: {a.version for a in r.live()} == {"2"} and len(p.passing()) == 2, "version 2 rolled out", 15
        )
        unsubscribe()
        assert min(low) >= 2, f"fewer than 2 passing instances during the update: {low}"
        versions = {i.version for i in p.registry.snapshot.instances("web")}
        assert versions == {"2"}


async def test_draining_a_node_moves_its_instances(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(nodes("a", "b"), [job(count=2, spread={"attribute": "zone"})])
        await until(lambda: len(p.passing()) == 2, "two instances")
        r.set_node_status("a", "draining")
        await until(lambda: {a.node for a in r.live()} == {"b"} and len(p.passing()) == 2, "all on b")
        r.set_node_status("a", None)
        r.set_node_status("b", "down")
        await until(lambda: {a.node for a in r.live()} == {"a"} and len(p.passing()) == 2, "all on a")


async def test_near_lands_on_the_node_of_the_job_it_names(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        db = job("db", count=1, constraints=[{"attribute": "role", "value": "data"}])
        web = job("web", count=1, affinity=[{"near": "db", "weight": 100}])
        r = await p.reconciler(nodes("a", "b", "c", b={"role": "data"}), [web, db])
        await until(lambda: len(p.passing("db")) == 1 and len(p.passing("web")) == 1, "both up")
        assert {a.job: a.node for a in r.live()} == {"db": "b", "web": "b"}


async def test_unsatisfiable_job_is_explained(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        huge = job("huge", count=1, resources={"cpu": 64, "memory": "1Mi"})
        picky = job("picky", count=1, constraints=[{"attribute": "premise", "value": "onprem"}])
        r = await p.reconciler(nodes("a", "b"), [huge, picky])
        await until(lambda: {"huge", "picky"} <= set(r.unplaced), "both unplaced")
        assert r.unplaced["huge"].explanation == "Resources exhausted on 2 nodes: cpu"
        assert r.unplaced["picky"].explanation == 'Constraint "premise = onprem" filtered 2 nodes'
        described = {j["name"]: j["unplaced"] for j in describe_jobs(r)}
        assert described["huge"] == {"count": 1, "reason": "Resources exhausted on 2 nodes: cpu"}
        assert r.live() == []


async def test_deregistered_before_stopped(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r = await p.reconciler(None, [job(count=1, shutdown_delay="0.4s")])
        await until(lambda: len(p.passing()) == 1, "up")
        alloc = running(r)[0]
        pid = pid_of(alloc)
        gone_at: list[float] = []
        loop = asyncio.get_running_loop()

        def watch(snapshot: Any) -> None:
            if not snapshot.instances("web") and not gone_at:
                gone_at.append(loop.time())

        unsubscribe = p.registry.catalog.subscribe(watch)
        await r.set_declared(None, [job(count=0)])
        await until(lambda: bool(gone_at), "deregistered", 3)
        # The process is still serving while the router drains it...
        assert proc_starttime(pid) is not None
        assert await get(alloc.ports["http"]) == 200
        await until(lambda: proc_starttime(pid) is None, "stopped", 5)
        unsubscribe()
        assert loop.time() - gone_at[0] >= 0.3


async def test_restart_of_pointsman_adopts_running_tasks_and_stops_orphans(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r1 = Reconciler(p.store, p.registry, {"process": p.driver}, interval=0.1, port_range=PORTS)
        await r1.start(None, [job()])
        await until(lambda: len(p.passing()) == 2, "two instances")
        before = {a.id: pid_of(a) for a in running(r1)}
        # pointsman dies without stopping anything: its loop and runners vanish, the tasks live on.
        assert r1._loop_task is not None
        r1._loop_task.cancel()
        for alloc in r1.allocs.values():
            assert alloc.runner is not None
            alloc.runner.cancel()
        await asyncio.sleep(0.05)
        # An orphan: a task of ours that no allocation record wants.
        from scheduler.driver import TaskSpec

        orphan = await p.driver.start(TaskSpec("web-9-orphan", "web", ("sleep", "30"), {}, {}, 0.0, 0))
        r2 = await p.reconciler(None, [job()])
        await until(lambda: len(running(r2)) == 2, "adopted")
        after = {a.id: pid_of(a) for a in running(r2)}
        assert after == before, "adopted the same processes, started no duplicates"
        assert all(a.restarts == 0 for a in running(r2))
        pid = int(orphan.ref.split(":")[0])
        await until(lambda: proc_starttime(pid) is None, "orphan stopped", 5)
        await until(lambda: len(p.passing()) == 2, "still passing")


async def test_graceful_stop_keeps_allocations_for_the_next_start(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        r1 = Reconciler(p.store, p.registry, {"process": p.driver}, interval=0.1, port_range=PORTS)
        await r1.start(None, [job()])
        await until(lambda: len(p.passing()) == 2, "two instances")
        before = {a.id: a.ports["http"] for a in running(r1)}
        pids = [pid_of(a) for a in running(r1)]
        await r1.close()
        assert all(proc_starttime(pid) is None for pid in pids), "stopped with pointsman"
        assert p.passing() == []
        r2 = await p.reconciler(None, [job()])
        await until(lambda: len(p.passing()) == 2, "back")
        assert {a.id: a.ports["http"] for a in running(r2)} == before


async def test_upstream_reference_points_at_a_passing_instance(tmp_path: Path) -> None:
    async with platform(tmp_path) as p:
        db = job("db", count=1)
        client = job(
            "client",
            count=1,
            command=[sys.executable, "-c", "import os, time; print(os.environ['DB'], flush=True); time.sleep(30)"],
            ports=[],
            health=None,
            env={"DB": "http://${upstream:db}/x"},
        )
        r = await p.reconciler(None, [db, client])
        await until(lambda: bool(running(r, "client")), "client running", 10)
        (db_alloc,) = running(r, "db")
        (client_alloc,) = running(r, "client")
        stdout = r.log_paths(client_alloc)
        assert stdout is not None
        await until(lambda: stdout[0].exists() and stdout[0].read_text().strip() != "", "client printed")
        assert stdout[0].read_text().strip() == f"http://127.0.0.1:{db_alloc.ports['http']}/x"


@pytest.mark.parametrize("bad", [{"name": "Web"}, {"name": "web_1"}])
def test_job_names_are_dns_labels(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="name"):
        job(**bad)
