"""Passive outlier ejection of Cluster: consecutive failures eject, a timer brings back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from router.cluster import Cluster
from router.config import ClusterConfig
from tests.support import wait_until


def make_cluster(count: int, **outlier: Any) -> Cluster:
    settings = {"consecutive_failures": 3, "base_ejection": "50ms", "max_ejection": "1s", "max_ejected_percent": 100}
    settings.update(outlier)
    config = ClusterConfig.model_validate(
        {"endpoints": [("10.0.0.1", 9000 + i) for i in range(count)], "outlier": settings}
    )
    return Cluster("c", config)


def remaining(endpoint: Any) -> float:
    return float(endpoint.ejected_until - time.monotonic())


async def test_consecutive_failures_eject() -> None:
    cluster = make_cluster(2)
    e0, e1 = cluster.endpoints
    changes: list[list[str]] = []
    cluster.on_change.append(lambda c: changes.append([e.key for e in c.available]))
    cluster.record_failure(e0)
    cluster.record_failure(e0)
    cluster.record_success(e0)  # a success breaks the streak
    cluster.record_failure(e0)
    cluster.record_failure(e0)
    assert not e0.ejected
    cluster.record_failure(e0)
    assert e0.ejected and not e0.available and e0.ejections == 1
    assert cluster.available == [e1]
    assert changes == [[e1.key]]
    assert {cluster.pick() for _ in range(4)} == {e1}
    await cluster.stop()


async def test_ejected_endpoint_returns_after_the_timer() -> None:
    cluster = make_cluster(2)
    e0 = cluster.endpoints[0]
    started = time.monotonic()
    for _ in range(3):
        cluster.record_failure(e0)
    assert e0.ejected
    await wait_until(lambda: not e0.ejected, what="return from ejection")
    elapsed = time.monotonic() - started
    assert 0.045 <= elapsed < 1.0
    assert e0.available and e0 in cluster.available
    assert e0.consecutive_failures == 0  # a fresh start: one more failure does not re-eject
    cluster.record_failure(e0)
    assert not e0.ejected
    await cluster.stop()


async def test_ejection_time_grows_and_is_capped() -> None:
    cluster = make_cluster(2, base_ejection="50ms", max_ejection="120ms")
    e0 = cluster.endpoints[0]
    expected = [0.05, 0.10, 0.12, 0.12]  # base x ejections, capped at max_ejection
    for n, duration in enumerate(expected, start=1):
        for _ in range(3):
            cluster.record_failure(e0)
        assert e0.ejected and e0.ejections == n
        assert remaining(e0) == pytest.approx(duration, abs=0.01)
        await wait_until(lambda: not e0.ejected, what=f"return from ejection {n}")
    await cluster.stop()


async def test_max_ejected_percent_caps_ejections() -> None:
    cluster = make_cluster(4, max_ejected_percent=50, base_ejection="100ms")
    e0, e1, e2, e3 = cluster.endpoints
    for endpoint in (e0, e1):
        for _ in range(3):
            cluster.record_failure(endpoint)
    assert e0.ejected and e1.ejected
    for _ in range(10):
        cluster.record_failure(e2)
    # A third ejection would take 75% of the cluster out: e2 keeps serving.
    assert not e2.ejected and e2.available
    assert cluster.available == [e2, e3]
    await wait_until(lambda: not e0.ejected and not e1.ejected, what="returns")
    cluster.record_failure(e2)  # still failing, and now there is room to eject it
    assert e2.ejected
    await cluster.stop()


async def test_a_single_endpoint_cluster_is_never_emptied_by_the_default_cap() -> None:
    cluster = make_cluster(1, max_ejected_percent=50)
    e0 = cluster.endpoints[0]
    for _ in range(10):
        cluster.record_failure(e0)
    assert not e0.ejected and cluster.pick() is e0
    await cluster.stop()


async def test_without_outlier_config_failures_never_eject() -> None:
    cluster = Cluster("c", ClusterConfig.model_validate({"endpoints": ["10.0.0.1:1", "10.0.0.1:2"]}))
    e0 = cluster.endpoints[0]
    for _ in range(50):
        cluster.record_failure(e0)
    assert not e0.ejected and e0.consecutive_failures == 50
    await cluster.stop()


async def test_stop_cancels_ejection_timers() -> None:
    cluster = make_cluster(2, base_ejection="50ms")
    e0 = cluster.endpoints[0]
    for _ in range(3):
        cluster.record_failure(e0)
    await cluster.stop()
    await asyncio.sleep(0.1)
    # A retired cluster's state no longer changes (and no timer outlives it).
    assert e0.ejected
