"""Placement benchmark: 10,000 instances of mixed sizes on 1,000 uniform declared nodes.

Reports placements/second (one core, placement only: no drivers) and packing quality: nodes
used against the lower bound ceil(max(total cpu / node cpu, total memory / node memory)).
Targets: >= 2,000 placements/s and nodes used within 10% of the bound (bin-packing). Then
times `check_allocations` over the result (what the reconciler runs on every pass), which
must find no misfit: the placer's own plan fits.

    .venv/bin/python bench/sched.py [--instances 10000] [--nodes 1000] [--algorithm binpack]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.model import Job, Node, Resources
from scheduler.plan import check_allocations, place, place_into
from scheduler.state import ClusterState

GI = 1024**3
NODE = Resources(cpu=16.0, memory=64 * GI)
# (cpu cores, memory GiB): small web-ish services, cpu-heavy workers, memory-heavy caches.
SIZES = [(0.25, 0.5), (0.25, 2), (0.5, 1), (0.5, 4), (1, 2), (1, 6), (2, 4), (2, 8), (0.5, 8), (3, 4)]


def make_jobs(instances: int, rng: random.Random) -> list[Job]:
    jobs: list[Job] = []
    left = instances
    while left > 0:
        count = min(left, rng.randint(1, 30))
        cpu, mem = rng.choice(SIZES)
        jobs.append(
            Job(
                name=f"job{len(jobs)}",
                count=count,
                resources=Resources(cpu=cpu, memory=int(mem * GI)),
                ports=("http",),
            )
        )
        left -= count
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--algorithm", choices=["binpack", "spread"], default="binpack")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--pure",
        action="store_true",
        help="call place(nodes, allocations, job) per job, rebuilding usage from all allocations each time",
    )
    parser.add_argument("--min-rate", type=float, default=2000.0)
    parser.add_argument("--max-overhead", type=float, default=0.10)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    nodes = [Node(f"n{i:04d}", NODE, {"zone": f"z{i % 3}"}) for i in range(args.nodes)]
    jobs = make_jobs(args.instances, rng)
    total_cpu = sum(j.resources.cpu * j.count for j in jobs)
    total_mem = sum(j.resources.memory * j.count for j in jobs)
    bound = math.ceil(max(total_cpu / NODE.cpu, total_mem / NODE.memory))

    start = time.perf_counter()
    state = ClusterState(nodes)
    placed = failed = 0
    for job in jobs:
        if args.pure:
            plan = place(nodes, state.allocations, job, algorithm=args.algorithm, eval_id="bench")
            for alloc in plan.placements:
                state.commit(alloc)
        else:
            plan = place_into(state, job, algorithm=args.algorithm, eval_id="bench")
        placed += len(plan.placements)
        failed += len(plan.failures)
    elapsed = time.perf_counter() - start

    used = sum(1 for i in range(len(nodes)) if state.in_use(i))
    rate = placed / elapsed
    overhead = used / bound - 1
    mode = "place() per job" if args.pure else "place_into() on one state"
    print(f"jobs {len(jobs)}, instances {args.instances}, nodes {args.nodes}, algorithm {args.algorithm}, {mode}")
    print(f"demand: {total_cpu:.1f} cores, {total_mem / GI:.1f} GiB -> lower bound {bound} nodes")
    print(f"placed {placed}, failed {failed} in {elapsed:.3f}s: {rate:,.0f} placements/s")
    print(f"nodes used {used} vs lower bound {bound}: {overhead:+.1%}")
    ok_rate = rate >= args.min_rate
    ok_pack = args.algorithm != "binpack" or overhead <= args.max_overhead
    print(f"rate {'PASS' if ok_rate else 'FAIL'} (>= {args.min_rate:,.0f}/s)")
    if args.algorithm == "binpack":
        print(f"packing {'PASS' if ok_pack else 'FAIL'} (<= {args.max_overhead:.0%} over the bound)")
    start = time.perf_counter()
    misfits = check_allocations(nodes, state.allocations, jobs)
    checked = time.perf_counter() - start
    print(f"check_allocations: {len(state.allocations)} allocations in {checked * 1000:.1f} ms, {len(misfits)} misfits")
    ok = ok_rate and ok_pack and failed == 0 and not misfits
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
