from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "dataplane: passes traffic through the router's listeners (needs router/http_proxy.py)"
    )
