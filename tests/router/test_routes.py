from __future__ import annotations

from collections import Counter

import pytest

from router.cluster import Cluster
from router.config import ClusterConfig, RouteConfig
from router.routes import RouteTable, normalise_host


def _clusters(*names: str) -> dict[str, Cluster]:
    return {n: Cluster(n, ClusterConfig(endpoints=[("127.0.0.1", 1)])) for n in names}


def _table(*routes: dict) -> RouteTable:
    clusters = _clusters("a", "b", "c")
    return RouteTable.build("l", [RouteConfig.model_validate(r) for r in routes], clusters)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Example.COM:8080", "example.com"), ("[::1]:80", "[::1]"), ("a.b.", "a.b"), ("host", "host")],
)
def test_normalise_host(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


def test_first_match_wins_and_matchers() -> None:
    table = _table(
        {"match": {"host": "*.example.com", "path_prefix": "/api", "headers": {"x-canary": "1"}}, "to": "a"},
        {"match": {"host": "exact.org", "path": "/x"}, "to": "b"},
        {"match": {"path_regex": r"/items/\d+", "methods": ["get"]}, "to": "c"},
        {"match": {"path_prefix": "/api"}, "to": "b"},
    )
    assert table.uses_headers

    def m(method: str, host: str, path: str, headers: dict[str, str] | None = None) -> str | None:
        route = table.match(method, host, path, headers or {})
        return None if route is None else route.pick_cluster().name

    assert m("GET", "shop.example.com", "/api/v1", {"x-canary": "1"}) == "a"
    assert m("GET", "a.b.example.com", "/api", {"x-canary": "1"}) == "a"
    assert m("GET", "example.com", "/api", {"x-canary": "1"}) == "b"  # wildcard needs a label
    assert m("GET", "shop.example.com", "/api", {"x-canary": "0"}) == "b"
    assert m("GET", "exact.org", "/x") == "b"
    assert m("GET", "exact.org", "/x/y") is None
    assert m("GET", "any", "/items/42") == "c"
    assert m("POST", "any", "/items/42") is None
    assert m("GET", "any", "/items/42/more") is None  # regex matches the whole path


def test_weighted_split_follows_weights() -> None:
    table = _table({"split": [{"to": "a", "weight": 90}, {"to": "b", "weight": 10}, {"to": "c", "weight": 0}]})
    route = table.routes[0]
    counts = Counter(route.pick_cluster().name for _ in range(20000))
    assert counts["c"] == 0
    assert 0.87 < counts["a"] / 20000 < 0.93


def test_retries_only_for_idempotent_methods() -> None:
    table = _table({"to": "a", "retries": {"attempts": 2, "on": ["connect-failure"]}})
    route = table.routes[0]
    assert route.retries_allowed("GET") == 2
    assert route.retries_allowed("POST") == 0


async def test_tests_run_on_uvloop() -> None:
    import asyncio

    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
