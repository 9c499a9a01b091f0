"""DockerDriver against a real Docker engine.

`scripts/ensure-docker.sh` runs once per session (installs docker.io and starts dockerd when we
are root); when `docker info` still fails every test here skips with the script's reason. The
image is built locally (tests/scheduler/docker_image.py); python3 comes from the host's /usr,
mounted read-only. Every container a test creates carries the label `pointsman.test=<run id>`
and is removed by the `cleanup_containers` fixture whatever the outcome.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import scheduler.drivers.docker as docker_driver
from scheduler.driver import DriverError, TaskSpec
from scheduler.drivers.docker import DockerDriver

from .docker_image import RUN_ID, TEST_LABEL, USR


@pytest.fixture
def driver(docker_image: str, cleanup_containers: Any, tmp_path: Path) -> Iterator[DockerDriver]:
    instance = DockerDriver(tmp_path / "docker-state")
    yield instance
    instance.close()


def alloc_id(tag: str) -> str:
    return f"t{RUN_ID}-{tag}-{uuid.uuid4().hex[:6]}"


def spec(
    tag: str,
    command: tuple[str, ...],
    *,
    ports: dict[str, int] | None = None,
    memory: int = 128 * 1024 * 1024,
    cpu: float = 0.5,
    volumes: dict[str, str] | None = None,
    image: str = "pointsman-test:busybox",
) -> TaskSpec:
    return TaskSpec(
        alloc_id=alloc_id(tag),
        job=f"job-{tag}",
        command=command,
        env={"GREETING": "hello"},
        ports=ports or {},
        cpu=cpu,
        memory=memory,
        image=image,
        volumes=volumes or {},
        labels={TEST_LABEL: RUN_ID},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_available(driver: DockerDriver) -> None:
    ok, why = await driver.available()
    assert ok, why
    assert "docker engine" in why


async def test_http_server_reachable_on_published_port(driver: DockerDriver, cleanup_containers: Any) -> None:
    port = free_port()
    command = ("python3", "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}")
    task = spec("http", command, ports={"http": port}, volumes=USR)
    started = time.monotonic()
    handle = await driver.start(task)
    start_took = time.monotonic() - started
    assert handle.driver == "docker"
    assert handle.alloc_id == task.alloc_id
    assert start_took < 10
    assert "memory=134217728" in handle.limits and "nano_cpus=500000000" in handle.limits

    container = cleanup_containers.containers.get(handle.ref)
    assert container.name == f"pointsman-{task.alloc_id}"
    assert container.attrs["HostConfig"]["Init"] is True
    bindings = container.attrs["HostConfig"]["PortBindings"]
    assert bindings == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert env["PORT_HTTP"] == str(port) and env["GREETING"] == "hello" and env["POINTSMAN_ALLOC_ID"] == task.alloc_id

    body = ""
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200
                    body = await response.text()
                    break
            except (TimeoutError, aiohttp.ClientError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    assert "Directory listing" in body

    task_exit = await driver.stop(handle, grace=2)
    assert task_exit.reason.startswith("stopped")
    assert task_exit.alloc_id == task.alloc_id
    assert cleanup_containers.containers.list(all=True, filters={"id": handle.ref}) == []
    stdout, stderr = driver.log_paths(task.alloc_id)
    assert stdout.exists() and stderr.exists()
    assert "GET /" in stderr.read_text()  # http.server logs requests on stderr
    # stop is idempotent: the container is gone, the recorded exit is returned again
    assert await driver.stop(handle) == task_exit


async def test_exit_code_propagates_and_logs_are_kept(driver: DockerDriver) -> None:
    task = spec("exit", ("sh", "-c", "echo out ${GREETING}; echo err >&2; exit 3"))
    handle = await driver.start(task)
    task_exit = await asyncio.wait_for(driver.wait(handle), 30)
    assert task_exit.code == 3
    assert task_exit.signal is None
    assert task_exit.reason == "exited 3"
    stdout, stderr = driver.log_paths(task.alloc_id)
    assert stdout.read_text() == "out hello\n"
    assert stderr.read_text() == "err\n"
    assert (await driver.stop(handle)).code == 3  # already ended: stop removes it, reports the same exit


async def test_wait_outlasts_one_wait_request(driver: DockerDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task running longer than one blocking wait request: the driver asks again."""
    monkeypatch.setattr(docker_driver, "_WAIT_CHUNK", 0.5)
    handle = await driver.start(spec("long", ("sh", "-c", "sleep 2; exit 5")))
    task_exit = await asyncio.wait_for(driver.wait(handle), 30)
    assert task_exit.code == 5


async def test_cancelled_wait_leaves_the_task_alone(driver: DockerDriver) -> None:
    handle = await driver.start(spec("cancel", ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done")))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(driver.wait(handle), 0.3)
    assert handle in await driver.running()
    assert (await driver.stop(handle, grace=3)).reason == "stopped (exited 0)"


async def test_many_waits_do_not_starve_other_calls(driver: DockerDriver) -> None:
    """More pending waits than asyncio's default executor has threads; start and stop still work."""
    forever = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done")
    handles = [await driver.start(spec(f"many{i}", forever)) for i in range(8)]
    waiters = [asyncio.create_task(driver.wait(handle)) for handle in handles]
    await asyncio.sleep(0.3)
    extra = await asyncio.wait_for(driver.start(spec("extra", ("true",))), 15)
    # A grace that holds on a loaded machine: nine containers may take a while to act on TERM,
    # and a SIGKILL after the grace is a different exit (137), not what this tests.
    exits = await asyncio.wait_for(asyncio.gather(*(driver.stop(h, grace=10) for h in [*handles, extra])), 60)
    assert [e.code for e in exits] == [0] * 9
    assert [e.code for e in await asyncio.wait_for(asyncio.gather(*waiters), 30)] == [0] * 8


async def test_stop_with_grace_lets_the_task_exit(driver: DockerDriver) -> None:
    script = "trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.1; done"
    handle = await driver.start(spec("grace", ("sh", "-c", script)))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    task_exit = await driver.stop(handle, grace=5)
    assert time.monotonic() - started < 4
    assert task_exit.code == 0
    assert task_exit.reason == "stopped (exited 0)"
    stdout, _ = driver.log_paths(handle.alloc_id)
    assert stdout.read_text() == "up\nbye\n"


async def test_stop_kills_after_grace(driver: DockerDriver) -> None:
    handle = await driver.start(spec("kill", ("sh", "-c", "trap '' TERM; while true; do sleep 0.1; done")))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    task_exit = await driver.stop(handle, grace=1)
    took = time.monotonic() - started
    assert 0.9 <= took < 10
    assert task_exit.signal == 9
    assert task_exit.code is None
    assert "SIGKILL" in task_exit.reason and task_exit.reason.startswith("stopped")


async def test_memory_limit_is_enforced(driver: DockerDriver) -> None:
    allocate = "data = b'x' * (200 * 1024 * 1024); print(len(data))"
    task = spec("oom", ("python3", "-c", allocate), memory=64 * 1024 * 1024, volumes=USR)
    handle = await driver.start(task)
    assert "memory=67108864" in handle.limits
    task_exit = await asyncio.wait_for(driver.wait(handle), 30)
    assert task_exit.reason == "oom-killed", task_exit
    assert task_exit.signal == 9
    stdout, _ = driver.log_paths(task.alloc_id)
    assert stdout.read_text() == ""
    await driver.stop(handle)


async def test_labels_running_and_cleanup_find_only_ours(driver: DockerDriver, cleanup_containers: Any) -> None:
    forever = ("sh", "-c", "while true; do sleep 0.2; done")
    keep = await driver.start(spec("keep", forever))
    orphan = await driver.start(spec("orphan", forever))
    foreign = cleanup_containers.containers.run(
        "pointsman-test:busybox",
        list(forever),
        detach=True,
        labels={TEST_LABEL: RUN_ID, "pointsman.alloc": "not-ours"},
        name=f"foreign-{RUN_ID}",
    )

    labels = cleanup_containers.containers.get(keep.ref).labels
    assert labels["pointsman.alloc"] == keep.alloc_id
    assert labels["pointsman.job"] == "job-keep"
    assert labels["pointsman.owned"] == driver.owner
    assert labels[TEST_LABEL] == RUN_ID

    running = await driver.running()
    refs = {handle.ref for handle in running}
    assert {keep.ref, orphan.ref} <= refs
    assert foreign.id not in refs
    # Another pointsman (another state directory) on the same engine: none of these are its.
    other = DockerDriver(driver.state_dir.parent / "another-pointsman")
    assert not {keep.ref, orphan.ref} & {handle.ref for handle in await other.running()}
    assert await other.cleanup(set()) == []
    other.close()
    assert keep in running  # the same handle start() gave: adoptable as is

    # Keep every other container of ours on this engine (this may not be the only user of it).
    others = {handle.alloc_id for handle in driver._all_handles() if handle.alloc_id != orphan.alloc_id}
    removed = await driver.cleanup(keep=others)
    assert removed == [orphan.alloc_id]
    refs = {handle.ref for handle in await driver.running()}
    assert keep.ref in refs and orphan.ref not in refs
    foreign.reload()
    assert foreign.status == "running"
    await driver.stop(keep, grace=1)


async def test_second_driver_adopts_running_containers(driver: DockerDriver, docker_image: str, tmp_path: Path) -> None:
    handle = await driver.start(spec("adopt", ("sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done")))
    waiter = asyncio.create_task(driver.wait(handle))
    restarted = DockerDriver(tmp_path / "docker-state")  # pointsman restarted: nothing in memory
    adopted = [h for h in await restarted.running() if h.alloc_id == handle.alloc_id]
    assert adopted == [handle]
    task_exit = await restarted.stop(adopted[0], grace=5)
    assert task_exit.code == 7 and task_exit.reason == "stopped (exited 7)"
    first_view = await asyncio.wait_for(waiter, 30)
    assert first_view.alloc_id == handle.alloc_id
    assert first_view.code == 7
    restarted.close()


async def test_bad_specs_raise_driver_error(driver: DockerDriver, cleanup_containers: Any) -> None:
    with pytest.raises(DriverError, match=r"unknown variable \$\{PORT_NOPE\}"):
        await driver.start(spec("badvar", ("sh", "-c", "echo ${PORT_NOPE}")))
    with pytest.raises(DriverError, match="not found locally"):
        await driver.start(spec("noimage", ("true",), image=f"pointsman-missing-{RUN_ID}:none"))
    with pytest.raises(DriverError, match="needs an image"):
        await driver.start(TaskSpec("x1", "j", ("true",), {}, {}, 0.1, 0))
    assert cleanup_containers.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}) == []
