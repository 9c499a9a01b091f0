"""The scheduler's section of the config tree: `nodes`, `jobs` and `scheduler`.

Pydantic models for what people declare, converted to the placement core's dataclasses by
`NodeConfig.to_node()` and `JobConfig.to_job()`. Values written by hand get forgiving parsers
(durations `500ms`/`2s`/`1m`, memory `128Mi`, cpu `500m`). Checks that need more than one
field or entry (unique names, `affinity.near` naming a job, `${PORT_X}` naming a declared port)
are done by :func:`check_declarations`, which returns every problem with its path.

This module depends on pydantic and the scheduler only (not on the router or pointsman).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from scheduler.model import Affinity, Constraint, Job, Node, Resources, Spread, parse_cpu, parse_memory
from units import Duration

LOCAL_NODE = "local"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A job is also a service: its name is a DNS label (`web.svc.internal`), lowercase, short
# enough that an allocation id `<job>-<index>-<12 hex>` is one too.
_JOB_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"


Cpu = Annotated[
    float,
    BeforeValidator(parse_cpu),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d+)?m?$"}],
            "description": "cores: 0.5, 2 or millicores 500m",
        }
    ),
]
Memory = Annotated[
    int,
    BeforeValidator(parse_memory),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(b|k|K|M|G|T|Ki|Mi|Gi|Ti)?\s*$"},
            ],
            "description": "bytes or a size: 128Mi, 2Gi, 512M",
        }
    ),
]
DriverName = Literal["process", "docker"]
Name = Annotated[str, Field(pattern=_NAME_PATTERN, max_length=63)]
JobName = Annotated[
    str,
    Field(
        pattern=_JOB_NAME_PATTERN,
        max_length=40,
        description="lowercase letters, digits and '-': the job is served as the DNS name <job>.svc.internal",
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesConfig(Strict):
    cpu: Cpu = 0.0
    memory: Memory = 0

    def to_resources(self) -> Resources:
        return Resources(self.cpu, self.memory)


def _meminfo_total(path: str = "/proc/meminfo") -> int:
    """MemTotal in bytes, 0 if unreadable."""
    try:
        for line in Path(path).read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def auto_capacity() -> Resources:
    """This machine: every CPU and all of MemTotal (nothing held back)."""
    return Resources(float(os.cpu_count() or 1), _meminfo_total())


class NodeConfig(Strict):
    """A machine jobs can be placed on; `local` (this machine) is implicit when `nodes` is absent."""

    name: Name
    capacity: Literal["auto"] | ResourcesConfig = Field(
        default="auto", description="auto = this machine's CPUs and memory"
    )
    attributes: dict[str, str] = Field(default_factory=dict)
    drivers: list[DriverName] = Field(
        default_factory=lambda: list[DriverName](["process", "docker"]),
        min_length=1,
        description="drivers the node offers; `pointsman up` also drops those not available here (no engine)",
    )
    reserved_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list)
    status: Literal["ready", "draining", "down"] = "ready"
    driver_host: Name | None = Field(default=None, description="the node whose drivers run this node's tasks")

    def to_node(self) -> Node:
        capacity = auto_capacity() if self.capacity == "auto" else self.capacity.to_resources()
        return Node(
            name=self.name,
            capacity=capacity,
            attributes=dict(self.attributes),
            drivers=frozenset(self.drivers),
            reserved_ports=frozenset(self.reserved_ports),
            status=self.status,
        )


class DockerConfig(Strict):
    image: str = Field(min_length=1)
    command: list[str] = Field(default_factory=list)
    volumes: dict[str, str] = Field(default_factory=dict, description="host path -> container path[:ro]")


class JobHealthConfig(Strict):
    """An HTTP GET of `http` on port `port` (2xx/3xx passes) or, without `http`, a TCP connect."""

    http: str | None = None
    port: str
    interval: Duration = 10.0
    timeout: Duration = 2.0
    grace: Duration = Field(default=1.0, description="failing checks are ignored this long after a start")
    unhealthy_after: Annotated[int, Field(ge=1)] = Field(
        default=3, description="restart the task once checks have failed for this many intervals (after grace)"
    )

    @field_validator("http")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"health.http must be a path starting with '/', got {value!r}")
        return value


class ConstraintConfig(Strict):
    attribute: str = Field(min_length=1)
    op: Literal["=", "!=", "in", "not_in", "regex", "exists"] = "="
    value: str = ""

    def to_constraint(self) -> Constraint:
        return Constraint(self.attribute, self.op, self.value)

    @model_validator(mode="after")
    def _regex(self) -> ConstraintConfig:
        if self.op == "regex":
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"bad regex {self.value!r}: {exc}") from None
        return self


class AffinityConfig(Strict):
    near: str = Field(min_length=1, description="a job: prefer (weight > 0) or avoid (< 0) its nodes")
    weight: Annotated[int, Field(ge=-100, le=100)] = 50

    @field_validator("weight")
    @classmethod
    def _nonzero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("weight must not be 0 (use -100..-1 to avoid, 1..100 to prefer)")
        return value

    def to_affinity(self) -> Affinity:
        return Affinity(self.near, self.weight)


class SpreadConfig(Strict):
    attribute: str = Field(min_length=1)


class RestartConfig(Strict):
    """Restart a task that ended `attempts` times within `interval`, waiting `delay` doubled each
    time up to `max_delay`; one more failure fails the allocation and it is placed anew."""

    attempts: Annotated[int, Field(ge=0)] = 5
    interval: Duration = 300.0
    delay: Duration = 1.0
    max_delay: Duration = 30.0


class UpdateConfig(Strict):
    max_parallel: Annotated[int, Field(ge=1)] = 1
    healthy_for: Duration = 3.0


class UpstreamConfig(Strict):
    """A sidecar: a local listener per instance, carrying the instance's identity, that forwards
    to `service` (a job or a registry service) through the router."""

    service: Annotated[str, Field(pattern=_JOB_NAME_PATTERN, max_length=40)]
    port: str | None = Field(
        default=None, description="the service's named port (default: the first port of the job of that name)"
    )
    protocol: Literal["tcp", "http", "postgres", "mysql"] = "tcp"
    local_port: Literal["auto"] = Field(default="auto", description="allocated per instance like the job's ports")
    env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the variable pointing the app at it (default: <SERVICE>_ADDR=127.0.0.1:PORT, "
        "or <SERVICE>_URL=http://127.0.0.1:PORT for http)",
    )
    policies: list[str] = Field(default_factory=list, description="postgres, mysql: policies[] rules to apply")

    @property
    def port_name(self) -> str:
        """The allocation's port for the local listener (`${PORT_UP_DB}`)."""
        return f"up-{self.service}"

    @property
    def variable(self) -> str:
        if self.env is not None:
            return self.env
        base = self.service.upper().replace("-", "_")
        return f"{base}_URL" if self.protocol == "http" else f"{base}_ADDR"


class JobConfig(Strict):
    name: JobName
    version: str = "1"
    driver: DriverName = "process"
    command: list[str] = Field(default_factory=list)
    docker: DockerConfig | None = None
    count: Annotated[int, Field(ge=0)] = 1
    resources: ResourcesConfig = ResourcesConfig()
    ports: list[Name] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    health: JobHealthConfig | None = None
    constraints: list[ConstraintConfig] = Field(default_factory=list)
    affinity: list[AffinityConfig] = Field(default_factory=list)
    spread: SpreadConfig | None = None
    upstreams: list[UpstreamConfig] = Field(
        default_factory=list, description="sidecars: per instance, a local listener to each of these services"
    )
    restart: RestartConfig = RestartConfig()
    update: UpdateConfig = UpdateConfig()
    network: Literal["host", "namespace"] = Field(
        default="host",
        description="process driver: host = the host's network; namespace = an address of its own on "
        "bridge pm0 and the internal DNS as its resolver (needs root and iproute2)",
    )
    shutdown_delay: Duration = Field(
        default=0.5, description="between deregistering an instance and stopping it, so the router drains it"
    )
    kill_timeout: Duration = Field(default=5.0, description="SIGTERM, then SIGKILL after this long")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # `version: 1` is as natural to write as `version: "1"`.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def to_job(self) -> Job:
        return Job(
            name=self.name,
            version=self.version,
            driver=self.driver,
            count=self.count,
            resources=self.resources.to_resources(),
            ports=(*self.ports, *(u.port_name for u in self.upstreams)),
            constraints=tuple(c.to_constraint() for c in self.constraints),
            affinity=tuple(a.to_affinity() for a in self.affinity),
            spread=Spread(self.spread.attribute) if self.spread is not None else None,
        )


class SchedulerConfig(Strict):
    algorithm: Literal["binpack", "spread"] = "binpack"


def effective_nodes(nodes: Sequence[NodeConfig] | None) -> list[NodeConfig]:
    """The declared nodes, or the implicit `local` node when none are declared."""
    return list(nodes) if nodes is not None else [NodeConfig(name=LOCAL_NODE)]


# -- cross-checks ---------------------------------------------------------------------------

Path_ = tuple[str | int, ...]

# `$${NAME}` escapes, `${NAME}` substitutes (the drivers' syntax, see scheduler/driver.py).
_REFERENCE_RE = re.compile(r"\$(\$?)\{([^}]*)\}")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UPSTREAM_RE = re.compile(r"^upstream:(.*)$")
# CONFIG_DIR (the config file's directory) and STATE_DIR are the reconciler's; the rest the driver's.
_BUILTINS = ("HOST", "POINTSMAN_ALLOC_ID", "CONFIG_DIR", "STATE_DIR")


def port_variable(port: str) -> str:
    """`http` -> `PORT_HTTP`, `admin-api` -> `PORT_ADMIN_API` (as the drivers name them)."""
    return "PORT_" + port.upper().replace("-", "_").replace(".", "_")


def _check_references(job: JobConfig, text: str) -> Iterator[str]:
    ports = {port_variable(p): p for p in (*job.ports, *(u.port_name for u in job.upstreams))}
    for match in _REFERENCE_RE.finditer(text):
        escaped, name = match.group(1), match.group(2)
        if escaped:
            continue
        if m := _UPSTREAM_RE.match(name):
            # Any job or service name: what is not a job here is left to discovery.
            if not re.match(_NAME_PATTERN, m.group(1)):
                yield f"bad reference ${{{name}}}: expected ${{upstream:NAME}} with a job or service name"
            continue
        if not _VAR_RE.match(name):
            yield f"bad reference ${{{name}}}: expected ${{NAME}} or ${{upstream:NAME}}"
        elif name.startswith("PORT_") and name not in ports:
            declared = ", ".join(job.ports) or "none"
            yield f"${{{name}}} refers to an undeclared port (declared ports: {declared})"
        elif not name.startswith("PORT_") and name not in _BUILTINS and name not in job.env:
            known = ", ".join(sorted({*_BUILTINS, *ports, *job.env}))
            yield f"unknown variable ${{{name}}} (known: {known})"


def _check_job(job: JobConfig, i: int, jobs: Mapping[str, JobConfig]) -> Iterator[tuple[Path_, str]]:
    job_names = list(jobs)
    base: Path_ = ("jobs", i)
    if job.driver == "docker" and job.docker is None:
        yield (*base, "docker"), "the docker driver needs docker: {image: ...}"
    if job.driver == "docker" and job.network != "host":
        yield (*base, "network"), "network: namespace is for the process driver (containers have their own)"
    if job.driver == "process" and not job.command:
        yield (*base, "command"), "the process driver needs a command"
    if job.health is not None and job.health.port not in job.ports:
        declared = ", ".join(job.ports) or "none"
        yield (*base, "health", "port"), f"unknown port {job.health.port!r} (declared ports: {declared})"
    seen_ports: set[str] = set()
    for k, port in enumerate(job.ports):
        if port_variable(port) in seen_ports:
            yield (*base, "ports", k), f"port {port!r} is declared twice"
        seen_ports.add(port_variable(port))
    for k, arg in enumerate(job.command):
        for reason in _check_references(job, arg):
            yield (*base, "command", k), reason
    if job.docker is not None:
        for k, arg in enumerate(job.docker.command):
            for reason in _check_references(job, arg):
                yield (*base, "docker", "command", k), reason
    for key, value in job.env.items():
        for reason in _check_references(job, value):
            yield (*base, "env", key), reason
    seen_upstreams: set[str] = set()
    for k, upstream in enumerate(job.upstreams):
        if upstream.service in seen_upstreams:
            yield (*base, "upstreams", k, "service"), f"upstream {upstream.service!r} is declared twice"
        seen_upstreams.add(upstream.service)
        target = jobs.get(upstream.service)
        if upstream.port is None and (target is None or not target.ports):
            why = "a job without ports" if target is not None else "not a job here"
            yield (*base, "upstreams", k, "port"), f"required: {upstream.service!r} is {why}"
        elif upstream.port is not None and target is not None and upstream.port not in target.ports:
            declared = ", ".join(target.ports) or "none"
            reason = f"job {upstream.service!r} has no port {upstream.port!r} (declared: {declared})"
            yield (*base, "upstreams", k, "port"), reason
        if upstream.policies and upstream.protocol not in ("postgres", "mysql"):
            yield (*base, "upstreams", k, "policies"), "policies are for protocol: postgres or mysql"
    for k, affinity in enumerate(job.affinity):
        if affinity.near not in job_names:
            known = ", ".join(job_names)
            yield (*base, "affinity", k, "near"), f"unknown job {affinity.near!r} (known: {known})"


def check_declarations(nodes: Sequence[NodeConfig] | None, jobs: Sequence[JobConfig]) -> list[tuple[Path_, str]]:
    """Every cross-reference problem of `nodes` and `jobs`, each with its path."""
    problems: list[tuple[Path_, str]] = []
    node_seen: dict[str, int] = {}
    for i, node in enumerate(nodes or ()):
        if node.name in node_seen:
            problems.append(
                (("nodes", i, "name"), f"node name {node.name!r} is also used by nodes[{node_seen[node.name]}]")
            )
        node_seen.setdefault(node.name, i)
    node_names = [n.name for n in effective_nodes(nodes)]
    for i, node in enumerate(nodes or ()):
        if node.driver_host is not None and node.driver_host not in node_names:
            known = ", ".join(node_names)
            problems.append((("nodes", i, "driver_host"), f"unknown node {node.driver_host!r} (known: {known})"))
    job_seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.name in job_seen:
            problems.append((("jobs", i, "name"), f"job name {job.name!r} is also used by jobs[{job_seen[job.name]}]"))
        job_seen.setdefault(job.name, i)
    by_name = {job.name: job for job in jobs}
    for i, job in enumerate(jobs):
        problems.extend(_check_job(job, i, by_name))
    return problems
