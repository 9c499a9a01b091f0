from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from router.metrics import RouterStats


def _exposition(stats: RouterStats) -> str:
    registry = CollectorRegistry()
    registry.register(stats)
    return generate_latest(registry).decode()


def test_unlabelled_counters_are_exported_at_zero_before_any_increment() -> None:
    text = _exposition(RouterStats())
    assert "pointsman_config_reload_failures_total 0.0" in text
    # Labelled series appear only once they exist (no invented label values).
    assert "pointsman_http_requests_total{" not in text


def test_counters_and_cumulative_histogram_buckets() -> None:
    stats = RouterStats()
    who = ("web", "v2", "web-0-1", "n1")  # the client's app, version, instance, node
    stats.http_requests.inc(("l", *who, "r", "c", "2xx"))
    stats.http_requests.inc(("l", *who, "r", "c", "2xx"))
    stats.reload_failures.inc(())
    for seconds in (0.0001, 0.003, 0.003, 50.0):
        stats.http_duration.observe(("l", *who, "r"), seconds)
    text = _exposition(stats)
    requests = 'app="web",cluster="c",code="2xx",instance="web-0-1",listener="l",node="n1",route="r",version="v2"'
    assert "pointsman_http_requests_total{" + requests + "} 2.0" in text
    assert "pointsman_config_reload_failures_total 1.0" in text
    for le, count in (("0.0005", 1.0), ("0.005", 3.0), ("30.0", 3.0), ("+Inf", 4.0)):
        labels = f'app="web",instance="web-0-1",le="{le}",listener="l",node="n1",route="r",version="v2"'
        assert "pointsman_http_request_duration_seconds_bucket{" + labels + f"}} {count}" in text
    labels = 'app="web",instance="web-0-1",listener="l",node="n1",route="r",version="v2"'
    assert "pointsman_http_request_duration_seconds_count{" + labels + "} 4.0" in text
