"""The route table of an HTTP listener: first match wins.

A table is built once from config (regexes compiled, clusters resolved to runtime objects,
split weights made cumulative) and never mutated; a reload builds a new one and swaps it in,
so a connection keeps the table it started with.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Mapping
from fnmatch import translate

from router.cluster import Cluster
from router.config import RetryConfig, RouteConfig

# Methods that may be retried: a second try cannot do what the first one did not already do.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def normalise_host(host: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host[colon + 1 :].isdigit():
        host = host[:colon]
    return host.rstrip(".")


class Route:
    __slots__ = (
        "_cumulative",
        "_host",
        "_host_suffix",
        "_rng",
        "apps",
        "clusters",
        "headers",
        "index",
        "methods",
        "name",
        "path",
        "path_prefix",
        "path_regex",
        "retries",
        "timeout",
        "total_weight",
        "versions",
    )

    def __init__(self, index: int, config: RouteConfig, clusters: Mapping[str, Cluster]) -> None:
        self.index = index
        self.name = config.name or str(index)
        match = config.match
        host = match.host.lower() if match.host else None
        if host is not None and host.startswith("*."):
            self._host: str | None = None
            self._host_suffix: str | None = host[1:]  # ".example.com"
        else:
            self._host = host
            self._host_suffix = None
        self.path_prefix = match.path_prefix
        self.path = match.path
        self.path_regex = re.compile(match.path_regex) if match.path_regex is not None else None
        self.methods = frozenset(m.upper() for m in match.methods) if match.methods else None
        self.headers = tuple((k.lower(), v) for k, v in match.headers.items())
        self.apps = _globs(match.apps)
        self.versions = _globs(match.versions)
        if config.to is not None:
            targets = [(clusters[config.to], 1)]
        else:
            targets = [(clusters[t.to], t.weight) for t in config.split or () if t.weight > 0]
        self.clusters = [c for c, _ in targets]
        self._cumulative: list[int] = []
        total = 0
        for _, weight in targets:
            total += weight
            self._cumulative.append(total)
        self.total_weight = total
        self._rng = random.Random()
        self.retries: RetryConfig | None = config.retries
        self.timeout = config.timeout

    def matches(
        self, method: str, host: str, path: str, headers: Mapping[str, str], who: tuple[str, ...] = ("", "")
    ) -> bool:
        """``who``: the client's identity labels (app, version, ...), known per connection."""
        if self._host is not None and host != self._host:
            return False
        if self._host_suffix is not None and not (
            host.endswith(self._host_suffix) and len(host) > len(self._host_suffix)
        ):
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path is not None and path != self.path:
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for name, value in self.headers:
            if headers.get(name) != value:
                return False
        if self.apps is not None and self.apps.match(who[0]) is None:
            return False
        return self.versions is None or self.versions.match(who[1]) is not None

    def pick_cluster(self) -> Cluster:
        """The route's cluster; for a split, chosen by weight."""
        if len(self.clusters) == 1:
            return self.clusters[0]
        point = self._rng.random() * self.total_weight
        return self.clusters[bisect.bisect_right(self._cumulative, point)]

    def retries_allowed(self, method: str) -> int:
        if self.retries is None or method not in IDEMPOTENT_METHODS:
            return 0
        return self.retries.attempts


class RouteTable:
    """Immutable list of routes of one listener."""

    __slots__ = ("listener", "routes", "uses_headers")

    def __init__(self, listener: str, routes: list[Route]) -> None:
        self.listener = listener
        self.routes = routes
        # Most tables match on host and path only; then the proxy need not build a header dict.
        self.uses_headers = any(r.headers for r in routes)

    @classmethod
    def build(cls, listener: str, configs: list[RouteConfig], clusters: Mapping[str, Cluster]) -> RouteTable:
        return cls(listener, [Route(i, c, clusters) for i, c in enumerate(configs)])

    def match(
        self, method: str, host: str, path: str, headers: Mapping[str, str], who: tuple[str, ...] = ("", "")
    ) -> Route | None:
        """First route that matches; ``host`` already normalised, ``path`` without the query,
        ``who`` the client's identity labels (a connection's route cache stays valid: they do
        not change within a connection)."""
        for route in self.routes:
            if route.matches(method, host, path, headers, who):
                return route
        return None


def _globs(patterns: list[str] | None) -> re.Pattern[str] | None:
    """One case-sensitive regex for a list of globs (None: match anything)."""
    if patterns is None:
        return None
    return re.compile("|".join(f"(?:{translate(p.strip())})" for p in patterns))
