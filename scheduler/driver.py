"""The driver contract: how the scheduler starts, watches and stops the task of one allocation.

A driver turns a `TaskSpec` (what to run, with which ports and limits) into a running task and
hands back a `TaskHandle` that is plain data: it can be written down and, after a restart of
pointsman, matched again against what `running()` reports (adoption). Every way a task ends is
a `TaskExit`, whether it exited by itself, was stopped, or was killed by the kernel.

Drivers: `scheduler/drivers/process.py` (host processes, cgroup v2 or v1 limits where writable,
optionally a network namespace each) and `scheduler/drivers/docker.py` (containers).

Commands and environment values may refer to `${PORT_<NAME>}`, `${HOST}`, `${POINTSMAN_ALLOC_ID}`
and to the spec's own env (`${VAR}`); `task_variables()` builds that table and `expand()` applies
it. A reference to anything else is a `DriverError`, never an empty string: a typo in a port
name would otherwise start a server on a random port. `$${X}` is a literal `${X}`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.errors import SchedulerError


class DriverError(SchedulerError):
    """A task could not be started, found or stopped as asked; the message says which and why."""


@dataclass(frozen=True)
class TaskSpec:
    """What to run for one allocation. `cpu` is in cores, `memory` in bytes (0 = no limit)."""

    alloc_id: str
    job: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    ports: Mapping[str, int]
    cpu: float
    memory: int
    host: str = "127.0.0.1"
    image: str | None = None  # docker only
    volumes: Mapping[str, str] = field(default_factory=dict)  # docker: host path -> "container path[:ro]"
    labels: Mapping[str, str] = field(default_factory=dict)
    # process driver: "host" (the host's network) or "namespace" (an address of its own on a
    # bridge, see scheduler/netns.py; ${HOST} is then that address)
    network: str = "host"
    dns: str | None = None  # namespace: the IPv4 nameserver (port 53) of its resolv.conf; default the gateway


@dataclass(frozen=True)
class TaskHandle:
    """A started task. `ref` is "pid:starttime" (process) or the container id (docker).

    `limits` says what is really enforced, e.g. "cgroup v2 memory.max=134217728 cpu.max=25000 100000"
    or "none: cgroups not writable" — reported, never assumed.
    """

    alloc_id: str
    driver: str
    ref: str
    started_at: float
    limits: str
    address: str | None = None  # the task's own address (network "namespace"), else None
    # Where the task's own connections come from when that is not `address`: a container's
    # address on the engine's bridge (its ports are published on 127.0.0.1, its instance
    # registered there). Shared listeners know the task by it (placement identity).
    source_address: str | None = None


@dataclass(frozen=True)
class TaskExit:
    """How a task ended: `code` when it exited, `signal` when a signal killed it (one of them is
    usually None; both are None when the driver could not learn it, e.g. an adopted process).
    `reason` is for people: "exited 0", "killed by signal 9 (SIGKILL)", "stopped", "oom-killed"...
    """

    alloc_id: str
    code: int | None
    signal: int | None
    at: float
    reason: str


class Driver(ABC):
    """Runs the tasks of allocations on this host. All methods are safe to call after a restart:
    the driver's own records (files, container labels) are the source of truth, not memory."""

    name: str

    @abstractmethod
    async def available(self) -> tuple[bool, str]:
        """Whether this driver can run tasks here, and why not (or what it found) as text."""

    @abstractmethod
    async def start(self, spec: TaskSpec) -> TaskHandle:
        """Start the task; raises `DriverError` (bad command, unknown `${...}`, engine refused)."""

    @abstractmethod
    async def stop(self, handle: TaskHandle, grace: float = 5.0) -> TaskExit:
        """SIGTERM, then SIGKILL after `grace` seconds; returns how it ended. Idempotent."""

    @abstractmethod
    async def wait(self, handle: TaskHandle) -> TaskExit:
        """Return when the task ends, whatever the cause."""

    @abstractmethod
    async def running(self) -> list[TaskHandle]:
        """Tasks of ours still alive, from the driver's own records (for adoption after a restart)."""

    @abstractmethod
    async def cleanup(self, keep: set[str]) -> list[str]:
        """Stop our tasks whose alloc_id is not in `keep` (orphans); return their alloc ids."""

    @abstractmethod
    def log_paths(self, alloc_id: str) -> tuple[Path, Path]:
        """The stdout and stderr files of the allocation's task."""


# `$${NAME}` escapes, `${NAME}` substitutes; anything else after `$` is left alone.
_REFERENCE_RE = re.compile(r"\$(\$?)\{([^}]*)\}")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def port_variable(port: str) -> str:
    """`http` -> `PORT_HTTP`, `admin-api` -> `PORT_ADMIN_API`."""
    name = "PORT_" + port.upper().replace("-", "_")
    if not _NAME_RE.match(name):
        raise DriverError(f"port name {port!r} does not make a variable name ({name!r})")
    return name


def task_variables(spec: TaskSpec) -> dict[str, str]:
    """What `${...}` may refer to: the spec's env (raw), then PORT_*, HOST and POINTSMAN_ALLOC_ID,
    which win over an env entry of the same name (the platform's values are authoritative)."""
    variables = dict(spec.env)
    for port, number in spec.ports.items():
        variables[port_variable(port)] = str(number)
    variables["HOST"] = spec.host
    variables["POINTSMAN_ALLOC_ID"] = spec.alloc_id
    return variables


def expand(template: str, variables: Mapping[str, str]) -> str:
    """Replace each `${NAME}` with `variables[NAME]`; an unknown name raises `DriverError`."""

    def substitute(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        if not _NAME_RE.match(name):
            raise DriverError(f"bad reference ${{{name}}} in {template!r}: expected ${{NAME}}")
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise DriverError(f"unknown variable ${{{name}}} in {template!r} (known: {known})")
        return variables[name]

    return _REFERENCE_RE.sub(substitute, template)


def expand_spec(spec: TaskSpec) -> tuple[tuple[str, ...], dict[str, str]]:
    """The command and the task's environment with every reference expanded.

    The environment is the spec's env (values expanded) plus PORT_*, HOST and POINTSMAN_ALLOC_ID.
    Expansion is one pass over the raw values: `${A}` inside the value of B gives A's raw text.
    """
    variables = task_variables(spec)
    command = tuple(expand(part, variables) for part in spec.command)
    env = {name: expand(value, variables) for name, value in spec.env.items()}
    for name in ("HOST", "POINTSMAN_ALLOC_ID", *(port_variable(p) for p in spec.ports)):
        env[name] = variables[name]
    return command, env
