"""The reconciler with the Docker driver against the real engine: a container job is placed,
registered when it passes its check, killed from outside and restarted in place."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from discovery.config import DnsConfig
from discovery.dns import DnsServer
from discovery.registry import Registration
from pointsman.config import parse_config
from router.listeners import Router
from scheduler.config import JobConfig
from scheduler.drivers.docker import DockerDriver
from scheduler.netns import NetworkNamespaces
from scheduler.reconciler import Reconciler
from tests.support import http_upstream

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


async def test_containers_resolve_internal_names_through_the_bridge_dns(
    docker_image: str, cleanup_containers: Any, tmp_path: Path
) -> None:
    """What `pointsman up` does on first use (pointsman/scheduler_component.py): a bridge, the
    internal DNS on its gateway, and that address as every container's resolver."""
    if os.geteuid() != 0 or NetworkNamespaces.ip_command() is None:
        pytest.skip("a bridge needs root and iproute2")
    p = Platform(tmp_path)
    await p.start()
    tag = f"{os.getpid() % 10000:x}"
    network = NetworkNamespaces(tmp_path / "netns", bridge=f"pmd{tag}", subnet="10.216.0.0/16", prefix=f"d{tag}")
    await network.ensure_bridge()
    gateway = str(network.gateway)
    dns = DnsServer(
        DnsConfig.model_validate({"listen": f"{gateway}:53", "upstreams": [], "allow": ["172.16.0.0/12"]}),
        p.registry.catalog,
    )
    await dns.start()
    docker = DockerDriver(tmp_path / "docker")

    async def prepare(driver: str) -> str:
        return gateway

    r = Reconciler(p.store, p.registry, {"docker": docker}, interval=0.1, port_range=PORTS, prepare_network=prepare)
    try:
        await p.registry.register(
            Registration(id="db-1", service="db", address="10.1.2.3", ports={"pg": 5432}, source="config")
        )
        lookup = "import socket; print(socket.getaddrinfo('db.svc.internal', 5432)[0][4][0], flush=True)"
        job = JobConfig.model_validate(
            {
                "name": "asker",
                "driver": "docker",
                "docker": {"image": docker_image, "command": ["python3", "-c", lookup], "volumes": USR},
                "resources": {"cpu": 0.5, "memory": "64Mi"},
                "restart": {"attempts": 0},
            }
        )
        await r.start(None, [job])
        await until(lambda: bool(r.history), "the lookup ran", 30)
        (ended,) = r.history
        stdout, stderr = r.log_paths(ended) or (None, None)
        assert stdout is not None and stderr is not None
        assert stdout.read_text().strip() == "10.1.2.3", stderr.read_text()
    finally:
        await r.close()
        await docker.cleanup(set())
        docker.close()
        await dns.stop()
        await network.remove_bridge()
        await p.close()


async def test_a_container_is_known_by_its_address_at_a_shared_listener(
    docker_image: str, cleanup_containers: Any, tmp_path: Path
) -> None:
    """Placement identity for containers: the instance is registered at 127.0.0.1 (its ports
    are published there), but its connections to the host come from its address on the
    engine's bridge. The driver reports that address, the registration carries it, and a
    shared HTTP listener following the registry counts the container's requests as its job,
    version, allocation and node."""
    import docker as docker_sdk

    ipam = docker_sdk.from_env().networks.get("bridge").attrs["IPAM"]["Config"][0]
    # The host on the engine's default bridge (the engine leaves Gateway out when it is the
    # subnet's first address).
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    p = Platform(tmp_path)
    await p.start()
    docker = DockerDriver(tmp_path / "docker")
    r = Reconciler(p.store, p.registry, {"docker": docker}, interval=0.1, port_range=PORTS)
    async with http_upstream(_hello()) as up:
        config = {
            "clusters": {"hello": {"endpoints": [f"{up[0]}:{up[1]}"]}},
            "listeners": [{"name": "shared", "listen": "0.0.0.0:0", "routes": [{"name": "all", "to": "hello"}]}],
        }
        parsed = parse_config(config, "<test>")
        router = Router(catalog=p.registry.catalog)
        await router.apply(parsed.clusters, parsed.listeners, parsed.policies)
        port = router.listeners["shared"].address[1]
        try:
            # After a second: the instance is registered just after its container starts, and a
            # connection made before that has no identity to be found.
            fetch = f"sleep 1; wget -q -O- http://{gateway}:{port}/ && wget -q -O- http://{gateway}:{port}/; sleep 600"
            job = JobConfig.model_validate(
                {
                    "name": "caller",
                    "version": "3",
                    "driver": "docker",
                    "docker": {"image": docker_image, "command": ["sh", "-c", fetch]},
                    "resources": {"cpu": 0.5, "memory": "64Mi"},
                }
            )
            await r.start(None, [job])

            def counted() -> dict[tuple[str, ...], float]:
                return {k: v for k, v in router.stats.http_requests.values.items() if k[0] == "shared"}

            await until(lambda: sum(counted().values()) >= 2, "two requests from the container", 30)
            (alloc,) = r.live()
            source = (alloc.handle or {}).get("source_address")
            assert source and not source.startswith("127."), alloc.handle
            (instance,) = p.registry.catalog.snapshot.instances("caller")
            assert instance.address == "127.0.0.1" and instance.meta["source_address"] == source
            assert counted() == {("shared", "caller", "3", alloc.id, alloc.node, "all", "hello", "2xx"): 2.0}
        finally:
            await r.close()
            await router.close()
            await docker.cleanup(set())
            docker.close()
            await p.close()


def _hello() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello\n")

    app = web.Application()
    app.router.add_get("/", hello)
    return app
