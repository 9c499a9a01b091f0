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
    stats.http_requests.inc(("l", "r", "c", "2xx"))
    stats.http_requests.inc(("l", "r", "c", "2xx"))
    stats.reload_failures.inc(())
    for seconds in (0.0001, 0.003, 0.003, 50.0):
        stats.http_duration.observe(("l", "r"), seconds)
    text = _exposition(stats)
    assert 'pointsman_http_requests_total{cluster="c",code="2xx",listener="l",route="r"} 2.0' in text
    assert "pointsman_config_reload_failures_total 1.0" in text
    assert 'pointsman_http_request_duration_seconds_bucket{le="0.0005",listener="l",route="r"} 1.0' in text
    assert 'pointsman_http_request_duration_seconds_bucket{le="0.005",listener="l",route="r"} 3.0' in text
    assert 'pointsman_http_request_duration_seconds_bucket{le="30.0",listener="l",route="r"} 3.0' in text
    assert 'pointsman_http_request_duration_seconds_bucket{le="+Inf",listener="l",route="r"} 4.0' in text
    assert 'pointsman_http_request_duration_seconds_count{listener="l",route="r"} 4.0' in text
