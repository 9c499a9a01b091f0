"""The process's one Prometheus registry: what ``GET /metrics`` exposes.

A private :class:`CollectorRegistry` instead of prometheus_client's global ``REGISTRY``: two
supervisors in one process (as in the tests) then never see each other's series, and nothing
a library registers globally leaks into our exposition by accident.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector


def build_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry with the process/platform/GC collectors and ``collectors``.

    ``auto_describe`` makes ``register`` collect once and refuse a second collector that
    exports a name already taken, so two components cannot silently clash on a metric name.
    """
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry's text and its content type, negotiated from the scraper's Accept header
    (Prometheus asks for OpenMetrics when it can; curl gets the classic text format)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
