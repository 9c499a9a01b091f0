from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
    uvloop = None


def pytest_asyncio_loop_factories() -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the loop production runs on: uvloop where installed."""
    if uvloop is not None:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
