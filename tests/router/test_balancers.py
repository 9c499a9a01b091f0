"""Balancers over real Cluster/Endpoint objects (no sockets needed: picking is pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.balancers import HashBalancer, LeastRequestBalancer, RandomBalancer, RoundRobinBalancer
from router.cluster import Cluster, Endpoint
from router.config import ClusterConfig


def make_cluster(count: int, balancer: str = "round_robin") -> Cluster:
    endpoints = [("10.0.0.1", 8000 + i) for i in range(count)]
    return Cluster("c", ClusterConfig.model_validate({"endpoints": endpoints, "balancer": balancer}))


def keys(count: int) -> list[bytes]:
    return [f"client-{i}".encode() for i in range(count)]


# -- round robin -------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    cluster = make_cluster(3)
    e0, e1, e2 = cluster.endpoints
    assert [cluster.pick() for _ in range(7)] == [e0, e1, e2, e0, e1, e2, e0]


def test_round_robin_skips_unavailable_endpoints() -> None:
    cluster = make_cluster(3)
    e0, e1, e2 = cluster.endpoints
    cluster.set_healthy(e1, False)
    picks = [cluster.pick() for _ in range(6)]
    assert e1 not in picks
    assert Counter(picks) == {e0: 3, e2: 3}


def test_pick_excludes_and_returns_none_when_nothing_is_available() -> None:
    cluster = make_cluster(2)
    e0, e1 = cluster.endpoints
    assert all(cluster.pick(exclude=e0) is e1 for _ in range(5))
    cluster.set_healthy(e1, False)
    # Excluding the only available endpoint still returns it: better a retry on it than none.
    assert cluster.pick(exclude=e0) is e0
    cluster.set_healthy(e0, False)
    assert cluster.pick() is None


# -- least request -------------------------------------------------------------------------------


def test_least_request_prefers_fewer_active() -> None:
    cluster = make_cluster(2)
    busy, idle = cluster.endpoints
    busy.active, idle.active = 5, 1
    balancer = LeastRequestBalancer(random.Random(1))
    # With two endpoints both are always sampled, so the less busy one always wins.
    assert {balancer.pick(cluster.endpoints, None) for _ in range(200)} == {idle}


def test_least_request_power_of_two_shares() -> None:
    cluster = make_cluster(4)
    for active, endpoint in enumerate(cluster.endpoints):
        endpoint.active = active  # 0, 1, 2, 3
    balancer = LeastRequestBalancer(random.Random(2))
    n = 24000
    counts = Counter(balancer.pick(cluster.endpoints, None) for _ in range(n))
    e0, e1, e2, e3 = cluster.endpoints
    # Of the 6 equally likely pairs, e0 wins the 3 it is in, e1 2, e2 1, and e3 none.
    assert counts[e3] == 0
    assert counts[e0] / n == pytest.approx(3 / 6, abs=0.02)
    assert counts[e1] / n == pytest.approx(2 / 6, abs=0.02)
    assert counts[e2] / n == pytest.approx(1 / 6, abs=0.02)


def test_least_request_single_endpoint() -> None:
    cluster = make_cluster(1, "least_request")
    assert cluster.pick() is cluster.endpoints[0]


# -- random ----------------------------------------------------------------------------------------


def test_random_is_roughly_uniform() -> None:
    cluster = make_cluster(3)
    balancer = RandomBalancer(random.Random(3))
    n = 30000
    counts = Counter(balancer.pick(cluster.endpoints, None) for _ in range(n))
    assert set(counts) == set(cluster.endpoints)
    for endpoint in cluster.endpoints:
        # The standard deviation of each count is about 82: 5% is six of them.
        assert counts[endpoint] == pytest.approx(n / 3, rel=0.05)


# -- consistent hash ----------------------------------------------------------------------------------


def _mapping(cluster: Cluster, ks: list[bytes]) -> dict[bytes, Endpoint]:
    mapping: dict[bytes, Endpoint] = {}
    for k in ks:
        endpoint = cluster.pick(k)
        assert endpoint is not None
        mapping[k] = endpoint
    return mapping


def test_hash_is_consistent_and_spread() -> None:
    cluster = make_cluster(5, "hash")
    ks = keys(10000)
    first = _mapping(cluster, ks)
    assert _mapping(cluster, ks) == first
    shares = Counter(first.values())
    assert set(shares) == set(cluster.endpoints)
    for endpoint in cluster.endpoints:
        assert 0.1 < shares[endpoint] / len(ks) < 0.3  # 0.2 each, give or take the ring's unevenness


def test_hash_does_not_depend_on_the_process() -> None:
    """Two routers (or one after a restart) must send a key to the same endpoint: the ring
    is built from a stable hash, not Python's per-process salted hash()."""
    ks = keys(500)
    a, b = make_cluster(4, "hash"), make_cluster(4, "hash")
    assert {k: e.key for k, e in _mapping(a, ks).items()} == {k: e.key for k, e in _mapping(b, ks).items()}


def test_hash_moves_only_the_keys_of_an_endpoint_that_leaves() -> None:
    cluster = make_cluster(5, "hash")
    ks = keys(10000)
    before = _mapping(cluster, ks)
    gone = cluster.endpoints[2]
    cluster.set_healthy(gone, False)
    after = _mapping(cluster, ks)
    moved = {k for k in ks if after[k] is not before[k]}
    assert moved == {k for k in ks if before[k] is gone}
    assert gone not in after.values()
    # Its keys spread over the others (virtual nodes) rather than all landing on one neighbour.
    assert len({after[k] for k in moved}) >= 3
    cluster.set_healthy(gone, True)
    assert _mapping(cluster, ks) == before


def test_hash_respects_the_list_it_is_given() -> None:
    """Failover narrows the list (exclude, or every endpoint already tried): the ring walk
    must skip endpoints missing from it even though they are still 'available'."""
    cluster = make_cluster(4, "hash")
    for k in keys(200):
        owner = cluster.pick(k)
        assert owner is not None
        other = cluster.pick(k, exclude=owner)
        assert other is not None and other is not owner
        rest = [e for e in cluster.endpoints if e not in (owner, other)]
        third = cluster.balancer.pick(rest, k)
        assert third in rest


def test_hash_without_a_key_falls_back_to_round_robin() -> None:
    cluster = make_cluster(3, "hash")
    assert isinstance(cluster.balancer, HashBalancer)
    assert [cluster.pick(None) for _ in range(6)] == cluster.endpoints * 2


def test_make_balancer_names() -> None:
    assert isinstance(make_cluster(2, "round_robin").balancer, RoundRobinBalancer)
    assert isinstance(make_cluster(2, "least_request").balancer, LeastRequestBalancer)
    assert isinstance(make_cluster(2, "random").balancer, RandomBalancer)
    assert isinstance(make_cluster(2, "hash").balancer, HashBalancer)
