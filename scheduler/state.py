"""The working copy of cluster usage that placement reads and updates.

Per-node usage lives in plain lists indexed by node position (not objects per node) because
the checkers and rankers read them in the hot loop. Built once from (nodes, allocations);
`commit()` adds a placement so later instances of the same plan (and later jobs placed into
the same state) see it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scheduler.errors import SpecError
from scheduler.model import PORT_RANGE, Allocation, Node


class ClusterState:
    def __init__(
        self,
        nodes: Sequence[Node],
        allocations: Iterable[Allocation] = (),
        port_range: tuple[int, int] = PORT_RANGE,
    ) -> None:
        self.nodes: list[Node] = list(nodes)
        self.index: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.name in self.index:
                raise SpecError(f"node {node.name}: declared twice")
            self.index[node.name] = i
        n = len(self.nodes)
        self.port_low, self.port_high = port_range
        self.cpu_cap = [node.capacity.cpu for node in self.nodes]
        self.mem_cap = [node.capacity.memory for node in self.nodes]
        self.cpu_used = [0.0] * n
        self.mem_used = [0] * n
        # Ports taken on each node (reserved + allocated), the count still free in the dynamic
        # range, and a cursor: ports are only added during a plan, so the lowest free port
        # never moves down and allocation does not rescan the range.
        self.ports_taken: list[set[int]] = [set(node.reserved_ports) for node in self.nodes]
        self.ports_free = [
            (self.port_high - self.port_low + 1) - sum(1 for p in taken if self.port_low <= p <= self.port_high)
            for taken in self.ports_taken
        ]
        self.port_cursor = [self.port_low] * n
        self.node_jobs: list[dict[str, int]] = [{} for _ in range(n)]  # job name -> instances here
        self.job_nodes: dict[str, dict[int, int]] = {}  # job name -> node position -> instances
        # (job, version) -> node position -> instances: job anti-affinity counts only the
        # version being placed, so a rolling update's old instances do not push new ones away.
        self.version_nodes: dict[tuple[str, str], dict[int, int]] = {}
        self.allocated: set[tuple[str, str, int]] = set()  # (job, version, index)
        self.allocations: list[Allocation] = []
        for alloc in allocations:
            self.commit(alloc)

    def commit(self, alloc: Allocation) -> None:
        """Count an allocation against its node. Allocations on unknown nodes only mark the index taken."""
        job = alloc.job
        version = alloc.version
        self.allocated.add((job, version, alloc.index))
        self.allocations.append(alloc)
        i = self.index.get(alloc.node)
        if i is None:
            return
        resources = alloc.resources
        self.cpu_used[i] += resources.cpu
        self.mem_used[i] += resources.memory
        if alloc.ports:
            taken = self.ports_taken[i]
            for port in alloc.ports.values():
                if port not in taken:
                    taken.add(port)
                    if self.port_low <= port <= self.port_high:
                        self.ports_free[i] -= 1
        jobs = self.node_jobs[i]
        jobs[job] = jobs.get(job, 0) + 1
        nodes = self.job_nodes.get(job)
        if nodes is None:
            nodes = self.job_nodes[job] = {}
        nodes[i] = nodes.get(i, 0) + 1
        key = (job, version)
        nodes = self.version_nodes.get(key)
        if nodes is None:
            nodes = self.version_nodes[key] = {}
        nodes[i] = nodes.get(i, 0) + 1

    def pick_ports(self, i: int, count: int) -> list[int]:
        """The `count` lowest free ports of node `i` (caller checked ports_free); not yet taken."""
        taken = self.ports_taken[i]
        port = self.port_cursor[i]
        picked: list[int] = []
        while len(picked) < count:
            if port not in taken:
                picked.append(port)
            port += 1
        self.port_cursor[i] = port
        return picked

    def fullness(self, i: int) -> float:
        """cpu share + memory share used, 0..2."""
        cpu = self.cpu_used[i] / self.cpu_cap[i] if self.cpu_cap[i] > 0 else 1.0
        mem = self.mem_used[i] / self.mem_cap[i] if self.mem_cap[i] > 0 else 1.0
        return cpu + mem

    def in_use(self, i: int) -> bool:
        return bool(self.node_jobs[i]) or self.cpu_used[i] > 0 or self.mem_used[i] > 0
