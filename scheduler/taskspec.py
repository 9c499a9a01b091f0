"""What a driver is asked to run for an allocation: its command and env with pointsman's
variables expanded, its ports, resources, image, labels and network (a TaskSpec).

Expanded here: `${CONFIG_DIR}`, `${STATE_DIR}` and `${upstream:db}` (the allocation's sidecar
for db, `127.0.0.1:PORT`, when the job declares one, else `ADDRESS:PORT` of a passing instance
of db, its first port); `$${...}` is a literal `${...}`. The driver expands what is left
(`${PORT_X}`, `${HOST}`, the environment). Each upstream also gets its variable
(`DB_ADDR=127.0.0.1:PORT`, `API_URL=http://127.0.0.1:PORT`) unless the job's env sets it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from discovery.model import Snapshot
from scheduler.config import JobConfig
from scheduler.driver import DriverError, TaskSpec
from scheduler.records import Alloc

_UPSTREAM_RE = re.compile(r"\$(\$?)\{upstream:([^}]*)\}")
_BUILTIN_RE = re.compile(r"\$(\$?)\{(CONFIG_DIR|STATE_DIR)\}")


def task_spec(
    alloc: Alloc,
    config: JobConfig,
    variables: Mapping[str, str],
    snapshot: Snapshot | None,
    dns: str | None = None,
) -> TaskSpec:
    """The TaskSpec of ``alloc``. ``variables``: CONFIG_DIR and STATE_DIR; ``snapshot``: the
    registry's view, for upstreams without a sidecar (None: no registry); ``dns``: the internal
    DNS address a namespaced process or a container resolves with."""
    local = {u.service: alloc.ports[u.port_name] for u in config.upstreams}
    env = {name: expand(value, local, variables, snapshot) for name, value in config.env.items()}
    for u in config.upstreams:
        address = f"127.0.0.1:{local[u.service]}"
        env.setdefault(u.variable, f"http://{address}" if u.protocol == "http" else address)
    docker = config.docker if config.driver == "docker" else None
    command = docker.command if docker is not None else config.command
    return TaskSpec(
        alloc_id=alloc.id,
        job=alloc.job,
        command=tuple(expand(part, local, variables, snapshot) for part in command),
        env=env,
        ports=alloc.ports,
        cpu=alloc.cpu,
        memory=alloc.memory,
        image=docker.image if docker is not None else None,
        volumes=dict(docker.volumes) if docker is not None else {},
        labels={"pointsman.job": alloc.job, "pointsman.version": alloc.version, "pointsman.node": alloc.node},
        network=config.network,
        dns=dns,
    )


def expand(text: str, local: Mapping[str, int], variables: Mapping[str, str], snapshot: Snapshot | None) -> str:
    """``text`` with the variables above expanded. ``local``: the job's sidecar ports by
    service. Raises DriverError for an upstream with no passing instance yet (the allocation's
    start fails and is retried)."""

    def builtin(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)
        return variables.get(match.group(2), match.group(0))

    text = _BUILTIN_RE.sub(builtin, text)

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)[1:]
        service = match.group(2)
        if service in local:
            return f"127.0.0.1:{local[service]}"
        for instance in snapshot.instances(service) if snapshot is not None else ():
            if instance.ports:
                port = next(iter(instance.ports.values()))
                host = f"[{instance.address}]" if ":" in instance.address else instance.address
                return f"{host}:{port}"
        raise DriverError(f"${{upstream:{service}}}: no passing instance of {service} with a port yet")

    return _UPSTREAM_RE.sub(substitute, text)
