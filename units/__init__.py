"""Building blocks every package shares: config units (durations: ``500ms``, ``2s``, ``1m``, ``1h``)
here, and the plain counters behind `/metrics` in :mod:`units.metrics`.

Its own package, depending on pydantic and prometheus_client only, because DESIGN's import
rule keeps l7 and discovery from importing each other or the router, and each config section
used to carry its own copy of the parser (and the DNS server its own counters). Every package
may import this one; it imports none of them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms`` -> 0.5, ``2s`` -> 2.0, ``1m`` -> 60.0, ``1h`` -> 3600.0; bare numbers are seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("a duration is a number with a unit, like 500ms, 2s or 1m")
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration: use a number and ms, s, m or h (500ms, 2s, 1m)")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        seconds = float(value)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest way to write it back: ``0.5`` -> ``500ms``, ``2.0`` -> ``2s``."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds}s"


# The JSON schema says what people write (``5s``), not the parsed value, so an editor
# validating YAML against pointsman's schema accepts it.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)?$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "duration: 500ms, 2s, 1m, 1h or seconds",
        }
    ),
]
