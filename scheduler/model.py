"""Shared types of the placement core: resources, nodes, jobs, allocations and the plan.

All frozen dataclasses; the placement functions never mutate them. Parsing helpers turn
config-style strings ("128Mi", "500m") into numbers and raise `SpecError` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from scheduler.errors import SpecError

NodeStatus = Literal["ready", "draining", "down"]
NODE_STATUSES: frozenset[str] = frozenset({"ready", "draining", "down"})
CONSTRAINT_OPS: frozenset[str] = frozenset({"=", "!=", "in", "not_in", "regex", "exists"})
# Dynamic ports are handed out from this range on every node (inclusive), lowest free first.
PORT_RANGE: tuple[int, int] = (20000, 32000)

# Binary (Ki, Mi, ...) and decimal (K/k, M, G, ...) suffixes, Kubernetes-style.
_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_memory(value: int | str, what: str = "memory") -> int:
    """Bytes from 134217728, "128Mi", "2Gi", "512M" or "1.5Gi"."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected a size such as 128Mi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"{what}: must not be negative, got {value}")
        return value
    match = _MEMORY_RE.match(str(value))
    if match is None or match.group(2) not in _MEMORY_UNITS:
        raise SpecError(f"{what}: expected a size such as 128Mi, 2Gi, 512M or bytes, got {value!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_cpu(value: float | int | str, what: str = "cpu") -> float:
    """Cores from 2, 0.5, "1.5" or millicores "500m"."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected cores such as 0.5 or 500m, got {value!r}")
    try:
        if isinstance(value, str) and value.strip().endswith("m"):
            cores = float(value.strip()[:-1]) / 1000
        else:
            cores = float(value)
    except ValueError:
        raise SpecError(f"{what}: expected cores such as 0.5 or 500m, got {value!r}") from None
    if cores < 0 or cores != cores:
        raise SpecError(f"{what}: must be a non-negative number of cores, got {value!r}")
    return cores


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float = 0.0  # cores
    memory: int = 0  # bytes

    @classmethod
    def parse(cls, cpu: float | int | str = 0, memory: int | str = 0) -> Resources:
        return cls(parse_cpu(cpu), parse_memory(memory))


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    capacity: Resources
    attributes: dict[str, str] = field(default_factory=dict)
    drivers: frozenset[str] = frozenset({"process"})
    reserved_ports: frozenset[int] = frozenset()
    status: NodeStatus = "ready"

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("node.name: must not be empty")
        if self.status not in NODE_STATUSES:
            raise SpecError(f"node {self.name}: status must be one of ready, draining, down; got {self.status!r}")


@dataclass(frozen=True, slots=True)
class Constraint:
    """`attribute op value`: for in/not_in the value is a comma-separated list; exists ignores it."""

    attribute: str
    op: str = "="
    value: str = ""

    def __post_init__(self) -> None:
        if self.op not in CONSTRAINT_OPS:
            ops = ", ".join(sorted(CONSTRAINT_OPS))
            raise SpecError(f"constraint on {self.attribute!r}: unknown op {self.op!r} (one of {ops})")
        if self.op == "regex":
            try:
                re.compile(self.value)
            except re.error as exc:
                raise SpecError(f"constraint on {self.attribute!r}: bad regex {self.value!r}: {exc}") from None

    @property
    def label(self) -> str:
        """How explanations name it: `premise = onprem`, `gpu exists`."""
        return f"{self.attribute} exists" if self.op == "exists" else f"{self.attribute} {self.op} {self.value}"


@dataclass(frozen=True, slots=True)
class Affinity:
    """Prefer (weight > 0) or avoid (weight < 0) nodes running instances of job `near`."""

    near: str
    weight: int = 50

    def __post_init__(self) -> None:
        if not -100 <= self.weight <= 100 or self.weight == 0:
            raise SpecError(f"affinity near {self.near!r}: weight must be in -100..100 and not 0, got {self.weight}")


@dataclass(frozen=True, slots=True)
class Spread:
    """Spread the job's instances evenly over the values of a node attribute (e.g. `zone`)."""

    attribute: str


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    version: str = "1"
    driver: str = "process"
    count: int = 1
    resources: Resources = Resources()
    ports: tuple[str, ...] = ()  # named ports, one dynamic port each per instance
    constraints: tuple[Constraint, ...] = ()
    affinity: tuple[Affinity, ...] = ()
    spread: Spread | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("job.name: must not be empty")
        if self.count < 0:
            raise SpecError(f"job {self.name}: count must not be negative, got {self.count}")
        if len(set(self.ports)) != len(self.ports):
            raise SpecError(f"job {self.name}: port names must be distinct, got {list(self.ports)}")


@dataclass(frozen=True, slots=True)
class Allocation:
    id: str
    job: str
    version: str
    node: str
    index: int
    resources: Resources
    ports: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Misfit:
    """An existing allocation that no longer belongs on its node, and why, in words:
    `node b is down`, `constraint premise = onprem no longer holds on node b`,
    `node b over capacity: memory`. Found by `scheduler.feasible.check_allocations`."""

    alloc: Allocation
    reason: str


# Reason keys recorded by the checkers (see scheduler/feasible.py) and how explain() groups them.
_STATUS_RE = re.compile(r"^node (\w+)$")
_DRIVER_RE = re.compile(r"^driver (.+) unavailable$")
_CONSTRAINT_RE = re.compile(r"^constraint (.+)$")
_EXHAUSTED_RE = re.compile(r"^(\w+) exhausted$")


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


@dataclass(frozen=True, slots=True)
class Failure:
    """Instance `index` of `job` fit nowhere; `reasons` counts why each node was rejected."""

    job: str
    index: int
    reasons: dict[str, int]

    def explain(self) -> str:
        """Nomad-style: `Constraint "premise = onprem" filtered 7 nodes; Resources exhausted on 2 nodes: memory`."""
        if not self.reasons:
            return "No nodes in the cluster"
        parts: list[str] = []
        exhausted: dict[str, int] = {}
        for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            if m := _STATUS_RE.match(reason):
                parts.append(f'Node status "{m.group(1)}" filtered {_nodes(count)}')
            elif m := _DRIVER_RE.match(reason):
                parts.append(f'Driver "{m.group(1)}" unavailable on {_nodes(count)}')
            elif m := _CONSTRAINT_RE.match(reason):
                parts.append(f'Constraint "{m.group(1)}" filtered {_nodes(count)}')
            elif m := _EXHAUSTED_RE.match(reason):
                exhausted[m.group(1)] = count
            else:
                parts.append(f"{reason}: {_nodes(count)}")
        if exhausted:
            total = sum(exhausted.values())
            if len(exhausted) == 1:
                dims = next(iter(exhausted))
            else:
                dims = ", ".join(f"{dim} ({n})" for dim, n in exhausted.items())
            parts.append(f"Resources exhausted on {_nodes(total)}: {dims}")
        return "; ".join(parts)


@dataclass(slots=True)
class Plan:
    placements: list[Allocation] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def explain(self) -> str:
        """One line per distinct failure cause (coalesced like Nomad), after a placed/failed count."""
        lines = [f"Placed {len(self.placements)} of {len(self.placements) + len(self.failures)} instances"]
        groups: dict[str, list[Failure]] = {}
        for failure in self.failures:
            groups.setdefault(failure.explain(), []).append(failure)
        for text, failures in groups.items():
            indices = ", ".join(str(f.index) for f in failures)
            lines.append(f"{failures[0].job}: {len(failures)} failed (index {indices}): {text}")
        return "\n".join(lines)
