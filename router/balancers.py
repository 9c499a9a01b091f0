"""Load balancers: choose one endpoint among the available ones.

Each balancer is given the cluster's currently available endpoints (healthy and not ejected)
and returns one. They hold no per-request state beyond a counter, so they cost a few hundred
nanoseconds a pick.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.cluster import Endpoint


class Balancer:
    name = "base"

    def pick(self, available: Sequence[Endpoint], key: bytes | None) -> Endpoint:
        raise NotImplementedError


class RoundRobinBalancer(Balancer):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, available: Sequence[Endpoint], key: bytes | None) -> Endpoint:
        i = self._next % len(available)
        self._next = i + 1
        return available[i]


class RandomBalancer(Balancer):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, available: Sequence[Endpoint], key: bytes | None) -> Endpoint:
        return available[int(self._rng.random() * len(available))]


class LeastRequestBalancer(Balancer):
    """Power of two choices: sample two endpoints, take the one with fewer requests in flight.
    Near-optimal spreading without scanning every endpoint (Mitzenmacher; Envoy's default)."""

    name = "least_request"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, available: Sequence[Endpoint], key: bytes | None) -> Endpoint:
        n = len(available)
        if n == 1:
            return available[0]
        rnd = self._rng.random
        a = int(rnd() * n)
        b = int(rnd() * (n - 1))
        if b >= a:
            b += 1
        first, second = available[a], available[b]
        return second if second.active < first.active else first


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashBalancer(Balancer):
    """Consistent hashing on a ring with virtual nodes: a key keeps its endpoint while that
    endpoint is available, and only the keys of an endpoint that leaves move elsewhere."""

    name = "hash"
    VNODES = 160

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        points: list[tuple[int, int]] = []
        for index, endpoint in enumerate(endpoints):
            for v in range(self.VNODES):
                points.append((_hash64(f"{endpoint.key}#{v}".encode()), index))
        points.sort()
        self._ring = [p for p, _ in points]
        self._owners = [endpoints[i] for _, i in points]
        self._rr = RoundRobinBalancer()

    def pick(self, available: Sequence[Endpoint], key: bytes | None) -> Endpoint:
        if key is None:
            return self._rr.pick(available, None)
        start = bisect.bisect_left(self._ring, _hash64(key))
        owners = self._owners
        n = len(owners)
        for step in range(n):
            endpoint = owners[(start + step) % n]
            # Membership in the list given, not the endpoint's own flag: the caller may have
            # narrowed it (Cluster.pick's exclude, a failover skipping endpoints it tried).
            if endpoint in available:
                return endpoint
        return self._rr.pick(available, None)


def make_balancer(name: str, endpoints: Sequence[Endpoint]) -> Balancer:
    if name == "round_robin":
        return RoundRobinBalancer()
    if name == "least_request":
        return LeastRequestBalancer()
    if name == "random":
        return RandomBalancer()
    if name == "hash":
        return HashBalancer(endpoints)
    raise ValueError(f"unknown balancer {name!r}")
