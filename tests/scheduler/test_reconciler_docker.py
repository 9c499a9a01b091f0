"""The reconciler with the Docker driver against the real engine: a container job is placed,
registered when it passes its check, killed from outside and restarted in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scheduler.config import JobConfig
from scheduler.drivers.docker import DockerDriver
from scheduler.reconciler import Reconciler

from .docker_image import USR
from .test_reconciler import PORTS, Platform, get, until


async def test_a_killed_container_is_restarted_and_reregistered(
    docker_image: str, cleanup_containers: Any, tmp_path: Path
) -> None:
    p = Platform(tmp_path)
    await p.start()
    docker = DockerDriver(tmp_path / "docker")
    r = Reconciler(p.store, p.registry, {"process": p.driver, "docker": docker}, interval=0.1, port_range=PORTS)
    try:
        job = JobConfig.model_validate(
            {
                "name": "box",
                "driver": "docker",
                "docker": {
                    "image": docker_image,
                    "command": ["python3", "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}"],
                    "volumes": USR,
                },
                "count": 1,
                "ports": ["http"],
                "resources": {"cpu": 0.5, "memory": "64Mi"},
                "health": {"http": "/", "port": "http", "interval": "0.2s", "grace": "10s"},
                "restart": {"attempts": 3, "delay": "0.1s"},
                "shutdown_delay": "0.1s",
            }
        )
        await r.start(None, [job])
        await until(lambda: p.passing("box") != [], "the container passes its check", 30)
        (alloc,) = r.live()
        assert alloc.handle is not None and alloc.handle["driver"] == "docker"
        assert "memory=67108864" in alloc.handle["limits"]
        assert await get(alloc.ports["http"]) == 200
        first = alloc.handle["ref"]
        cleanup_containers.containers.get(first).kill()
        await until(lambda: alloc.restarts == 1, "restarted", 15)
        await until(lambda: p.passing("box") == [alloc.id], "passing again", 30)
        assert alloc.handle is not None and alloc.handle["ref"] != first  # a new container, same allocation
        await r.close()
        assert cleanup_containers.containers.list(all=True, filters={"label": f"pointsman.alloc={alloc.id}"}) == []
    finally:
        await r.close()
        await docker.cleanup(set())
        docker.close()
        await p.close()
