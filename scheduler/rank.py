"""Rankers: each returns a score for a feasible node, or None when it has nothing to say.

The stack averages the scores that were given (Nomad's ScoreNormalizationIterator), so a
ranker that does not apply to a node does not drag its score towards zero. Scores are in
-1..1; the fit score is in 0..1. The affinity score is not averaged but added, scaled by
`AFFINITY_SCALE` (see `AffinityRanker` and the rule in `scheduler.plan.Stack`).
"""

from __future__ import annotations

from scheduler.model import Job
from scheduler.state import ClusterState

# The largest difference the averaged rankers can make between two feasible nodes. Their
# average is at most 1 (every score 1) and at least -2/3: fit >= 0, job anti-affinity >= -1,
# attribute spread >= -1, over weights 1 + 1 + 1 (binpack adds BalancedRanker >= 0 at 0.5:
# -4/7). So two nodes' averages differ by less than 5/3.
AVERAGE_SPAN = 5.0 / 3.0
# An affinity of weight w adds w / 100 * AFFINITY_SCALE to a matching node's score. With 3.4,
# |w| >= 50 adds >= 1.7 > AVERAGE_SPAN, so it outweighs all averaged rankers together; w = 10
# adds 0.34, a tie-breaker between nodes that the others score within 0.34 of each other.
AFFINITY_SCALE = 3.4


class Ranker:
    weight = 1.0  # in the weighted average of the scores given (AffinityRanker: see above)

    def score(self, i: int) -> float | None:  # pragma: no cover - interface
        raise NotImplementedError

    def placed(self, i: int) -> None:
        """Called after an instance lands on node `i` (rankers with their own counts update them)."""


class FitRanker(Ranker):
    """Nomad's "best fit v3": 20 - (10^freeCpu + 10^freeMem), over 18, with this instance added.

    The exponent makes a nearly full node much more attractive than a half full one, which is
    what packs tightly. Spread mode uses the mirror image (emptiest node first).
    """

    def __init__(self, state: ClusterState, job: Job, *, spread: bool = False) -> None:
        self.state = state
        self.cpu = job.resources.cpu
        self.memory = job.resources.memory
        self.spread = spread

    def score(self, i: int) -> float | None:
        s = self.state
        cap_cpu = s.cpu_cap[i]
        cap_mem = s.mem_cap[i]
        free_cpu = 1.0 - (s.cpu_used[i] + self.cpu) / cap_cpu if cap_cpu > 0 else 0.0
        free_mem = 1.0 - (s.mem_used[i] + self.memory) / cap_mem if cap_mem > 0 else 0.0
        total = 10.0**free_cpu + 10.0**free_mem
        return (total - 2.0) / 18.0 if self.spread else (20.0 - total) / 18.0


class JobAntiAffinityRanker(Ranker):
    """Spread a job's own instances: -(collisions + 1) / count (at least -1) on nodes already
    running instances of the same job *and version*.

    Other versions do not count: in a rolling update the new version's instances are created
    before the old ones stop, and the old ones must not push the new ones away from nodes
    that suit them (they are about to leave).
    """

    def __init__(self, state: ClusterState, job: Job) -> None:
        # Live: commit() updates it.
        self.here = state.version_nodes.setdefault((job.name, job.version), {})
        self.count = max(job.count, 1)

    def score(self, i: int) -> float | None:
        collisions = self.here.get(i, 0)
        return max(-1.0, -(collisions + 1) / self.count) if collisions else None


class AffinityRanker(Ranker):
    """`near db` (weight > 0) pulls towards nodes running db; a negative weight pushes away.

    Score = sum of the weights of the matched affinities / 100 (one affinity: -1..1), and the
    stack *adds* score * `weight` to the average of the other rankers instead of averaging it
    in: normalising by the sum of |weights| (as Nomad does) would make weight 10 pull as hard
    as 100, and averaging lets an emptier node beat `near db` under spread.
    """

    weight = AFFINITY_SCALE

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.node_jobs = state.node_jobs
        self.affinity = [(a.near, a.weight / 100.0) for a in job.affinity]

    def score(self, i: int) -> float | None:
        jobs = self.node_jobs[i]
        matched = sum(w for near, w in self.affinity if jobs.get(near))
        return matched if matched else None


class AttributeSpreadRanker(Ranker):
    """Even spread over the values of an attribute: +1 for the least used value, -1 for the most.

    Values are those of ready nodes; a node without the attribute scores -1.
    """

    def __init__(self, state: ClusterState, job: Job, attribute: str) -> None:
        self.values: list[str | None] = [node.attributes.get(attribute) for node in state.nodes]
        self.counts: dict[str, int] = {
            v: 0 for node, v in zip(state.nodes, self.values, strict=True) if v is not None and node.status == "ready"
        }
        for i, n in state.job_nodes.get(job.name, {}).items():
            v = self.values[i]
            if v is not None:
                self.counts[v] = self.counts.get(v, 0) + n
        self._bounds()

    def _bounds(self) -> None:
        self.low = min(self.counts.values(), default=0)
        self.high = max(self.counts.values(), default=0)

    def score(self, i: int) -> float | None:
        v = self.values[i]
        if v is None:
            return -1.0
        if self.high == self.low:
            return 0.0
        mid = (self.high + self.low) / 2
        return max(-1.0, min(1.0, (mid - self.counts[v]) / ((self.high - self.low) / 2)))

    def placed(self, i: int) -> None:
        v = self.values[i]
        if v is not None:
            self.counts[v] = self.counts.get(v, 0) + 1
            self._bounds()


class BalancedRanker(Ranker):
    """Prefer nodes whose cpu and memory shares stay close after this instance: 1 - |cpu - memory|
    (Kubernetes' NodeResourcesBalancedAllocation).

    Packing on the sum of both shares alone fills some nodes' memory with memory-heavy
    instances while their cpu idles, and that cpu is lost for good. Weighted below the fit
    score so that with uniform instances the fuller node still wins (see `weight`).
    """

    # 0.5: with the test cases' 1-core/1Gi instances on 4-core/16Gi nodes a weight above
    # ~0.75 would prefer an empty node to a 3/4 full one; bench/sched.py packs best near 0.5.
    weight = 0.5

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.state = state
        self.cpu = job.resources.cpu
        self.memory = job.resources.memory

    def score(self, i: int) -> float | None:
        s = self.state
        cap_cpu = s.cpu_cap[i]
        cap_mem = s.mem_cap[i]
        if cap_cpu <= 0 or cap_mem <= 0:
            return None
        return 1.0 - abs((s.cpu_used[i] + self.cpu) / cap_cpu - (s.mem_used[i] + self.memory) / cap_mem)
