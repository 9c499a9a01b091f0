"""Parsing helpers, spec validation and the explanation format."""

from __future__ import annotations

import pytest

from scheduler.errors import SpecError
from scheduler.model import Affinity, Constraint, Failure, Job, Node, Resources, parse_cpu, parse_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128Mi", 128 * 1024**2),
        ("2Gi", 2 * 1024**3),
        ("512M", 512 * 1000**2),
        ("1.5Gi", 3 * 1024**3 // 2),
        ("64k", 64_000),
        ("4096", 4096),
        (4096, 4096),
        (" 1Ki ", 1024),
    ],
)
def test_parse_memory(text: int | str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("500m", 0.5), ("2", 2.0), (1, 1.0), (0.25, 0.25), ("1.5", 1.5)])
def test_parse_cpu(text: float | str, expected: float) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("bad", ["12Qi", "lots", "-1", "", True, -5])
def test_parse_memory_rejects(bad: int | str) -> None:
    with pytest.raises(SpecError, match="memory"):
        parse_memory(bad)


@pytest.mark.parametrize("bad", ["fast", "-1", "nan", True])
def test_parse_cpu_rejects(bad: float | str) -> None:
    with pytest.raises(SpecError, match="cpu"):
        parse_cpu(bad)


def test_resources_parse() -> None:
    assert Resources.parse("250m", "128Mi") == Resources(0.25, 128 * 1024**2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Constraint("zone", "~", "x"), "unknown op"),
        (lambda: Constraint("zone", "regex", "("), "bad regex"),
        (lambda: Affinity("db", 101), "weight"),
        (lambda: Affinity("db", 0), "weight"),
        (lambda: Job("web", count=-1), "count"),
        (lambda: Job("web", ports=("http", "http")), "distinct"),
        (lambda: Job(""), "job.name"),
        (lambda: Node("a", Resources(), status="gone"), "status"),  # type: ignore[arg-type]
    ],
)
def test_specs_are_validated(build: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("reasons", "text"),
    [
        (
            {"constraint premise = onprem": 7, "memory exhausted": 2, "driver docker unavailable": 1},
            'Constraint "premise = onprem" filtered 7 nodes; Driver "docker" unavailable on 1 node; '
            "Resources exhausted on 2 nodes: memory",
        ),
        ({"cpu exhausted": 1, "memory exhausted": 3}, "Resources exhausted on 4 nodes: memory (3), cpu (1)"),
        (
            {"node draining": 2, "node down": 1},
            'Node status "draining" filtered 2 nodes; Node status "down" filtered 1 node',
        ),
        ({"gpu exists": 1}, "gpu exists: 1 node"),
        ({}, "No nodes in the cluster"),
    ],
)
def test_failure_explain(reasons: dict[str, int], text: str) -> None:
    assert Failure("web", 0, reasons).explain() == text
