"""Configuration of SQL policies: the ``policies:`` list, as strict pydantic models.

Models forbid unknown keys (a typo never silently does nothing) and raise plain
``ValueError`` messages, which the project's config loader reports with their path
(``policies.1.when.between: ...``). Nothing here imports from the other packages.

Semantics written down once, used by :mod:`l7.policy`:

- ``match``: every key given must match (AND); within a key, any entry may match (OR). An
  omitted key matches anything; an empty list is an error (it would match nothing).
  ``verbs`` are upper-cased and checked against :data:`KNOWN_VERBS`. ``apps``, ``users``,
  ``databases`` and ``tables`` are :mod:`fnmatch` globs compared case-insensitively.
- ``when.between: "HH:MM-HH:MM"`` is the half-open local-time window [start, end) in
  ``timezone`` (an IANA name, default UTC). ``22:00-02:00`` wraps midnight. ``days`` names the
  day the window *starts* on: ``between: 22:00-02:00, days: [fri]`` covers Friday 22:00 to
  Saturday 02:00. Local time is wall-clock time, so the window follows DST by itself; on the
  spring-forward night a window over the skipped hour is that much shorter, on the fall-back
  night the repeated hour is inside twice.
- ``action``: ``allow | deny | log | dry_run`` or ``{rate_limit: "N/s" | "N/m", burst, over,
  max_delay}``. The bucket holds ``burst`` tokens (default N) and refills at N per period.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from units import parse_duration

# Every verb l7.classify can put in Statement.verb / Statement.verbs.
KNOWN_VERBS: frozenset[str] = frozenset(
    {
        "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE",
        "CREATE", "ALTER", "DROP", "TRUNCATE", "RENAME", "COMMENT", "GRANT", "REVOKE", "REFRESH", "REINDEX",
        "LOCK", "VACUUM", "ANALYZE", "CLUSTER", "OPTIMIZE", "REPAIR", "CHECKSUM",
        "COPY", "LOAD", "PREPARE", "EXECUTE", "DEALLOCATE", "DECLARE", "EXPLAIN", "SET",
        "BEGIN", "COMMIT", "ROLLBACK",
        "SHOW", "RESET", "SAVEPOINT", "RELEASE", "LISTEN", "NOTIFY", "UNLISTEN", "DISCARD", "CHECKPOINT",
        "FETCH", "MOVE", "CLOSE", "USE", "FLUSH", "KILL", "HANDLER", "DO", "CALL", "SECURITY",
        "REASSIGN", "IMPORT", "XA", "INSTALL", "UNINSTALL", "PURGE", "SHUTDOWN", "HELP", "UNLOCK",
        "OTHER",
    }
)  # fmt: skip

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_FULL_DAYS = {f"{d}day": d[:3] for d in ("mon", "tues", "wednes", "thurs", "fri", "satur", "sun")}
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
SimpleAction = Literal["allow", "deny", "log", "dry_run"]
SIMPLE_ACTIONS: tuple[str, ...] = ("allow", "deny", "log", "dry_run")

_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(s|m)\s*$")
_PERIOD_SECONDS = {"s": 1.0, "m": 60.0}


def parse_window(value: Any) -> tuple[int, int]:
    """``"01:00-03:00"`` -> (60, 180): minutes after local midnight, start and end."""
    if isinstance(value, tuple | list) and len(value) == 2 and all(type(v) is int for v in value):
        start, end = value
    elif isinstance(value, str):
        m = _WINDOW_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a time window: write HH:MM-HH:MM, e.g. 01:00-03:00 or 22:00-02:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        for h, mi in ((h1, m1), (h2, m2)):
            if h > 24 or mi > 59 or (h == 24 and mi != 0):
                raise ValueError(f"{value!r}: {h:02d}:{mi:02d} is not a time of day (00:00 to 24:00)")
        start, end = h1 * 60 + m1, h2 * 60 + m2
    else:
        raise ValueError("between is a string HH:MM-HH:MM, e.g. 01:00-03:00")
    if not (0 <= start < 1440 and 0 <= end <= 1440):
        raise ValueError(f"{value!r}: a window starts in 00:00-23:59 and ends in 00:00-24:00")
    end %= 1440  # 24:00 as an end is midnight
    if start == end:
        raise ValueError(f"{value!r}: start and end are equal; omit `when` to apply at all times")
    return start, end


def parse_rate(value: Any) -> float:
    """``"200/s"`` -> 200.0, ``"30/m"`` -> 0.5: tokens per second."""
    if not isinstance(value, str):
        raise ValueError("rate_limit is a string N/s or N/m, e.g. 200/s")
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a rate: write N/s or N/m, e.g. 200/s or 30/m")
    count = int(m.group(1))
    if count <= 0:
        raise ValueError(f"{value!r}: the rate must be at least 1 per period")
    return count / _PERIOD_SECONDS[m.group(2)]


def _no_bare_string(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("write a list, e.g. [orders]")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_Globs = Annotated[tuple[str, ...] | None, BeforeValidator(_no_bare_string)]


class PolicyMatch(_Strict):
    """What a rule applies to. All given keys must match; omitted keys match anything."""

    verbs: _Globs = Field(default=None, description="statement verbs (any of Statement.verbs)")
    apps: _Globs = Field(default=None, description="application name globs")
    versions: _Globs = Field(default=None, description="the client instance's version globs (placement identity)")
    instances: _Globs = Field(default=None, description="the client instance's name globs (placement identity)")
    nodes: _Globs = Field(default=None, description="the client instance's node globs (placement identity)")
    users: _Globs = Field(default=None, description="user name globs")
    databases: _Globs = Field(default=None, description="database name globs")
    tables: _Globs = Field(default=None, description="table globs, matched against table and schema.table")

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        verbs = tuple(v.strip().upper() for v in value)
        unknown = [v for v in verbs if v not in KNOWN_VERBS]
        if unknown:
            raise ValueError(f"unknown verb(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_VERBS))}")
        return verbs

    @field_validator("apps", "versions", "instances", "nodes", "users", "databases", "tables")
    @classmethod
    def _globs(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if any(not v.strip() for v in value):
            raise ValueError("empty pattern; use '*' to match anything")
        return tuple(v.strip().lower() for v in value)

    @model_validator(mode="after")
    def _non_empty(self) -> PolicyMatch:
        for key in ("verbs", "apps", "versions", "instances", "nodes", "users", "databases", "tables"):
            if getattr(self, key) == ():
                raise ValueError(f"{key}: an empty list matches nothing; omit the key to match anything")
        return self


class TimeWindow(_Strict):
    """A daily local-time window [start, end), optionally only on some days (of its start)."""

    between: Annotated[
        tuple[int, int],
        BeforeValidator(parse_window),
        WithJsonSchema({"type": "string", "pattern": r"^\s*\d{1,2}:\d{2}\s*-\s*\d{1,2}:\d{2}\s*$"}),
    ] = Field(description="HH:MM-HH:MM local time, end excluded; may wrap midnight (22:00-02:00)")
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. Europe/Berlin")
    days: tuple[Day, ...] | None = Field(default=None, description="days the window starts on: mon..sun")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin, UTC)") from None
        return value

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("an empty days list matches nothing; omit it for every day")
            out = [_FULL_DAYS.get(v.strip().lower(), v.strip().lower()) if isinstance(v, str) else v for v in value]
            bad = [v for v in out if v not in DAYS]
            if bad:
                raise ValueError(f"unknown day(s) {bad}; use {', '.join(DAYS)}")
            return out
        return value

    def contains(self, now: float) -> bool:
        """Is unix time ``now`` inside the window (local wall-clock time in ``timezone``)?"""
        local = datetime.fromtimestamp(now, ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        start, end = self.between
        weekday = local.weekday()
        if start < end:
            inside = start <= minute < end
        elif minute >= start:  # wrapping window, evening part: started today
            inside = True
        elif minute < end:  # wrapping window, morning part: started yesterday
            inside, weekday = True, (weekday - 1) % 7
        else:
            inside = False
        return inside and (self.days is None or DAYS[weekday] in self.days)


class RateLimitAction(_Strict):
    """A token bucket per (rule, app): ``rate_limit`` tokens per second, ``burst`` capacity."""

    rate_limit: Annotated[
        float, BeforeValidator(parse_rate), WithJsonSchema({"type": ["string", "number"], "examples": ["200/s"]})
    ] = Field(description="N/s or N/m")
    burst: int | None = Field(default=None, ge=1, description="bucket size; default N (one period's worth)")
    over: Literal["delay", "deny"] = Field(default="delay", description="what happens over the rate")
    max_delay: Annotated[
        float | None,
        BeforeValidator(lambda v: None if v is None else parse_duration(v)),
        WithJsonSchema({"type": ["string", "number", "null"], "examples": ["500ms", "2s"]}),
    ] = Field(default=None, description="longest delay; a longer wait is denied (53400). Default: no cap")

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        # burst defaults to N of "N/s" / "N/m", which only the raw text still says.
        if isinstance(data, dict) and data.get("burst") is None and isinstance(data.get("rate_limit"), str):
            m = _RATE_RE.match(data["rate_limit"])
            if m and int(m.group(1)) > 0:
                return {**data, "burst": int(m.group(1))}
        return data

    @model_validator(mode="after")
    def _check(self) -> RateLimitAction:
        if self.max_delay is not None and self.over == "deny":
            raise ValueError("max_delay only applies with over: delay")
        return self


def _action_tag(value: Any) -> str:
    return "rate_limit" if isinstance(value, dict | RateLimitAction) else "simple"


def _check_action(value: Any) -> Any:
    # Runs before the tagged union, so a bad value is reported at `action`, not `action.<tag>`.
    if isinstance(value, dict | RateLimitAction):
        return value
    if isinstance(value, str) and value.strip().lower() in SIMPLE_ACTIONS:
        return value.strip().lower()
    raise ValueError(f"{value!r} is not an action: use allow, deny, log, dry_run or {{rate_limit: 200/s, ...}}")


Action = Annotated[
    Annotated[SimpleAction, Tag("simple")] | Annotated[RateLimitAction, Tag("rate_limit")],
    Discriminator(_action_tag),
    BeforeValidator(_check_action),
]


class PolicyRule(_Strict):
    """One rule: if ``match`` (and ``when``) hold, ``action`` applies."""

    name: str = Field(min_length=1)
    match: PolicyMatch = Field(default_factory=PolicyMatch, description="default: every statement")
    when: TimeWindow | None = Field(default=None, description="default: at all times")
    action: Action

    @property
    def enforcing(self) -> bool:
        """False for log / dry_run: reported, never change the outcome."""
        return self.action not in ("log", "dry_run")


class PolicyConfig(_Strict):
    """The ``policies:`` list, evaluated in order (see :class:`l7.policy.PolicyEngine`)."""

    policies: tuple[PolicyRule, ...] = ()

    @field_validator("policies")
    @classmethod
    def _unique(cls, value: tuple[PolicyRule, ...]) -> tuple[PolicyRule, ...]:
        seen: set[str] = set()
        for rule in value:
            if rule.name in seen:
                raise ValueError(f"duplicate policy name {rule.name!r}: names must be unique")
            seen.add(rule.name)
        return value
