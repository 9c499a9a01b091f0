"""Sidecars: local listeners that carry an app's identity and forward to a registry service.

A scheduled job gets them from its ``upstreams:`` (the scheduler allocates the local ports); an
app pointsman does not run gets them from ``pointsman sidecar --app NAME``, which reads the
config file's ``sidecars:`` section (the models here) and follows a remote registry. Both turn
their upstreams into router listeners and clusters with :func:`upstream_routes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, WithJsonSchema

from l7.model import Identity
from router.config import IDENTITY_PROTOCOLS, SQL_PROTOCOLS, Address, ClusterConfig, ListenerConfig
from scheduler.config import Strict, UpstreamConfig

DEFAULT_REGISTRY = ("127.0.0.1", 9901)


@dataclass(frozen=True)
class LocalUpstream:
    """One local listener: 127.0.0.1:``local_port`` forwards to ``service``'s named ``port``
    (its usable instances in the catalog); its clients are ``identity`` (an http or SQL
    listener's series carry it, SQL policies match on it)."""

    name: str  # the router listener's name
    service: str
    port: str
    protocol: str
    local_port: int
    identity: Identity
    policies: tuple[str, ...] = field(default=())


def upstream_routes(upstreams: Iterable[LocalUpstream]) -> tuple[dict[str, ClusterConfig], list[ListenerConfig]]:
    """The router listeners and clusters of a set of local upstreams: one cluster per service
    and port (following the catalog), http with retries on connect failure, tcp and SQL
    forwarding as a whole; http and SQL ones count (and SQL ones police) their clients as the
    upstream's identity."""
    clusters: dict[str, ClusterConfig] = {}
    listeners: list[ListenerConfig] = []
    for up in upstreams:
        cluster = f"upstream.{up.service}.{up.port}"
        clusters.setdefault(cluster, ClusterConfig.model_validate({"service": up.service, "port": up.port}))
        listener: dict[str, Any] = {
            "name": up.name,
            "listen": f"127.0.0.1:{up.local_port}",
            "protocol": up.protocol,
        }
        if up.protocol == "http":
            listener["routes"] = [{"match": {"path_prefix": "/"}, "to": cluster, "retries": {}}]
        else:
            listener["to"] = cluster
        if up.protocol in IDENTITY_PROTOCOLS:
            i = up.identity
            listener["identity"] = {"app": i.app, "version": i.version, "instance": i.instance, "node": i.node}
        if up.protocol in SQL_PROTOCOLS:
            listener["policies"] = list(up.policies)
        listeners.append(ListenerConfig.model_validate(listener))
    return clusters, listeners


def _local_port(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError("a port (1-65535) or auto")


LocalPort = Annotated[
    int | Literal["auto"],
    PlainValidator(_local_port),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"const": "auto"}]}),
]


class SidecarUpstream(UpstreamConfig):
    """An upstream of a sidecar pointsman does not schedule: as a job's, but the named port is
    required (there is no job config to take the first port from), and the local port is fixed
    or picked once when the sidecar starts."""

    port: str = Field(description="the service's named port in the registry")
    local_port: LocalPort = Field(  # type: ignore[assignment]
        default="auto", description="a fixed port on 127.0.0.1, or auto: a free one, printed at start"
    )


class SidecarConfig(Strict):
    """`pointsman sidecar --app NAME`: local listeners for an app started by something else."""

    app: Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")]
    version: str = Field(default="", description="the app's version, a label of its HTTP and SQL series")
    instance: str = Field(default="", description="this copy of the app (e.g. its host and unit), a label too")
    node: str | None = Field(default=None, description="the node label (default: the machine's host name)")
    registry: Address = Field(
        default=DEFAULT_REGISTRY, description="the admin API of the pointsman whose registry to follow"
    )
    upstreams: list[SidecarUpstream] = Field(default_factory=list)

    def listener_name(self, upstream: UpstreamConfig) -> str:
        return f"sidecar.{self.app}.{upstream.service}"


def check_sidecars(sidecars: Sequence[SidecarConfig], policies: Sequence[str]) -> list[tuple[str, str]]:
    """Cross-checks (path, reason): one entry per app, one upstream per service and per fixed
    port within an app, and policies that exist."""
    problems: list[tuple[str, str]] = []
    apps: dict[str, int] = {}
    known = ", ".join(policies) or "none"
    for i, car in enumerate(sidecars):
        if car.app in apps:
            problems.append((f"sidecars[{i}].app", f"app {car.app!r} is also declared by sidecars[{apps[car.app]}]"))
        apps.setdefault(car.app, i)
        services: dict[str, int] = {}
        ports: dict[int, int] = {}
        for k, up in enumerate(car.upstreams):
            where = f"sidecars[{i}].upstreams[{k}]"
            if up.service in services:
                other = services[up.service]
                problems.append((f"{where}.service", f"service {up.service!r} is also upstreams[{other}]"))
            services.setdefault(up.service, k)
            if isinstance(up.local_port, int):
                if up.local_port in ports:
                    other = ports[up.local_port]
                    problems.append((f"{where}.local_port", f"port {up.local_port} is also used by upstreams[{other}]"))
                ports.setdefault(up.local_port, k)
            for m, name in enumerate(up.policies):
                if name not in policies:
                    problems.append((f"{where}.policies[{m}]", f"unknown policy {name!r} ({known})"))
    return problems
