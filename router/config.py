"""The router's section of the config tree: clusters and listeners.

Models are strict (unknown keys are errors, so a typo never silently does nothing). Values
people write by hand get forgiving parsers: durations as ``500ms``/``2s``/``1m`` and
addresses as ``host:port``. Cross-references (a route naming a cluster) are checked by
:func:`check_references`, which returns every problem with its path instead of stopping at
the first one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from l7.model import Identity
from units import Duration


def parse_address(value: Any) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``localhost:80``, ``[::1]:80`` -> (host, port)."""
    if isinstance(value, tuple | list) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"{value!r} is not host:port (IPv6 is written [::1]:80)")
            port = rest[1:]
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:8080")
            if ":" in host:
                raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. [::1]:80")
    else:
        raise ValueError("an address is a string host:port, e.g. 127.0.0.1:8080")
    try:
        port_number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r}: port {port!r} is not a number") from None
    if not 0 <= port_number <= 65535:
        raise ValueError(f"{value!r}: port {port_number} is outside 0-65535")
    return str(host), port_number


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Address = Annotated[
    tuple[str, int],
    BeforeValidator(parse_address),
    PlainSerializer(format_address, return_type=str),
    WithJsonSchema({"type": "string", "description": "host:port, e.g. 127.0.0.1:8080 or [::1]:80"}),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthConfig(Strict):
    """Active health checks: an HTTP GET of ``http`` (2xx/3xx passes) or, without it, a TCP connect."""

    http: str | None = Field(default=None, description="path to GET; without it, a TCP connect")
    host: str | None = Field(default=None, description="Host header for HTTP checks")
    interval: Duration = 5.0
    timeout: Duration = 1.0
    unhealthy_after: int = Field(default=3, ge=1)
    healthy_after: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _path(self) -> HealthConfig:
        if self.http is not None and not self.http.startswith("/"):
            raise ValueError(f"http: the health check path must start with '/', got {self.http!r}")
        if self.interval <= 0:
            raise ValueError("interval must be greater than zero")
        return self


class OutlierConfig(Strict):
    """Passive ejection: an endpoint failing ``consecutive_failures`` times in a row is ejected
    for ``base_ejection`` x (number of times it was ejected before + 1), capped at ``max_ejection``."""

    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejected_percent: int = Field(default=50, ge=0, le=100)


class LimitsConfig(Strict):
    """Circuit-breaker limits: when full, new requests are answered 503 at once."""

    max_connections: int = Field(default=1024, ge=1, description="upstream connections, all endpoints")
    max_pending: int = Field(default=1024, ge=0, description="requests waiting for a connection")
    max_requests: int = Field(default=4096, ge=1, description="requests in flight")


class HashOn(Strict):
    header: str | None = None
    cookie: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HashOn:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("hash_on takes exactly one of header or cookie")
        return self


Balancer = Literal["round_robin", "least_request", "random", "hash"]


class ClusterConfig(Strict):
    # For editors: fixed endpoints (at least one) or a service with its port.
    model_config = ConfigDict(
        **Strict.model_config,
        json_schema_extra={
            "anyOf": [
                {"required": ["endpoints"], "properties": {"endpoints": {"minItems": 1}}},
                {"required": ["service", "port"]},
            ]
        },
    )

    endpoints: list[Address] = Field(default_factory=list, description="fixed upstream addresses")
    service: str | None = Field(
        default=None, description="follow this registry service's healthy instances instead of fixed endpoints"
    )
    port: str | None = Field(default=None, description="with service: the instances' named port to use")
    balancer: Balancer = "round_robin"
    hash_on: HashOn | None = Field(
        default=None, description="for balancer: hash; without it the client address is hashed"
    )
    health: HealthConfig | None = None
    outlier: OutlierConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    connect_timeout: Duration = 5.0
    idle_timeout: Duration = Field(default=60.0, description="idle upstream keep-alive connections close after this")

    @model_validator(mode="after")
    def _source(self) -> ClusterConfig:
        if self.service is None:
            if not self.endpoints:
                raise ValueError("a cluster needs 'endpoints' (a list of host:port) or 'service' (a registry service)")
            if self.port is not None:
                raise ValueError("'port' names a registry service's port; it needs 'service'")
        else:
            if self.endpoints:
                raise ValueError("a cluster takes 'endpoints' or 'service', not both")
            if self.port is None:
                raise ValueError("a cluster following a service needs 'port': the instances' named port")
        return self


class RouteMatch(Strict):
    host: str | None = Field(default=None, description="exact host or *.suffix wildcard")
    path_prefix: str | None = None
    path: str | None = Field(default=None, description="exact path")
    path_regex: str | None = Field(default=None, description="regular expression matched against the whole path")
    methods: list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="exact header values")
    apps: list[str] | None = Field(
        default=None,
        description="the client's app (its identity: the listener's, or the placement table's "
        "instance for the client address); globs, * any run of characters",
    )
    versions: list[str] | None = Field(default=None, description="the client instance's version; globs")

    @model_validator(mode="after")
    def _check(self) -> RouteMatch:
        given = [k for k in ("path_prefix", "path", "path_regex") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"use one of path_prefix, path, path_regex (got {', '.join(given)})")
        for key in ("path_prefix", "path"):
            value = getattr(self, key)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{key} must start with '/', got {value!r}")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex {self.path_regex!r} is not a valid regular expression: {exc}") from None
        for key in ("apps", "versions"):
            value = getattr(self, key)
            if value is not None and (not value or any(not v.strip() for v in value)):
                raise ValueError(f"{key}: give at least one non-empty pattern, or omit the key to match anything")
        if self.host is not None and "*" in self.host.removeprefix("*."):
            raise ValueError(f"host {self.host!r}: only a leading '*.' wildcard is supported")
        return self


class SplitTarget(Strict):
    to: str
    weight: int = Field(ge=0)


RetryOn = Literal["connect-failure", "gateway-error", "reset", "5xx"]


def _default_retry_on() -> list[RetryOn]:
    return ["connect-failure"]


class RetryConfig(Strict):
    """Retries apply to idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) whose body
    was not streamed yet; ``attempts`` counts retries after the first try."""

    attempts: int = Field(default=1, ge=0, le=10)
    on: list[RetryOn] = Field(default_factory=_default_retry_on)
    per_try_timeout: Duration | None = None


class RouteConfig(Strict):
    name: str | None = Field(default=None, description="label in metrics; defaults to the route's index")
    match: RouteMatch = RouteMatch()
    to: str | None = None
    split: list[SplitTarget] | None = None
    retries: RetryConfig | None = None
    timeout: Duration = Field(default=15.0, description="whole-response timeout; 0 disables it")

    @model_validator(mode="after")
    def _target(self) -> RouteConfig:
        if (self.to is None) == (self.split is None):
            raise ValueError("a route takes exactly one of 'to' (a cluster) or 'split'")
        if self.split is not None:
            if not self.split:
                raise ValueError("split needs at least one target")
            if sum(t.weight for t in self.split) <= 0:
                raise ValueError("split weights add up to zero: at least one must be positive")
        return self

    def clusters(self) -> Iterator[tuple[tuple[str | int, ...], str]]:
        if self.to is not None:
            yield ("to",), self.to
        for i, target in enumerate(self.split or ()):
            yield ("split", i, "to"), target.to


class HttpSettings(Strict):
    max_header_bytes: int = Field(default=65536, ge=1024, description="request line + headers; over it: 431")
    header_timeout: Duration = Field(default=10.0, description="time to send the whole header block; over it: 408")
    idle_timeout: Duration = Field(default=60.0, description="idle downstream keep-alive connections close after this")
    xff: bool = Field(default=True, description="add X-Forwarded-For/-Proto/-Host and Via")


class TlsConfig(Strict):
    cert: str | None = Field(default=None, description="PEM certificate chain presented to clients")
    key: str | None = Field(default=None, description="PEM private key of the certificate")
    upstream: Literal["disable", "require"] = Field(
        default="disable",
        description="require: speak TLS to the server too (as libpq's sslmode=require: encrypted, "
        "the server's certificate not verified); disable: clear",
    )

    @model_validator(mode="after")
    def _readable(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("'cert' and 'key' go together: both to terminate client TLS, or neither")
        for what, path in (("cert", self.cert), ("key", self.key)):
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"{what}: cannot read {path!r}: {exc.strerror or exc}") from None
        return self

    @property
    def terminate(self) -> bool:
        return self.cert is not None


SQL_PROTOCOLS = ("postgres", "mysql")
# Listeners whose series carry the client's identity (app, version, instance, node).
IDENTITY_PROTOCOLS = ("http", *SQL_PROTOCOLS)


class IdentityConfig(Strict):
    """Who every client of a listener is (a sidecar's listener serves one instance): the
    labels of its series and what policies match on."""

    app: str = Field(min_length=1)
    version: str = ""
    instance: str = ""
    node: str = ""


class ListenerConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    listen: Address
    protocol: Literal["http", "tcp", "postgres", "mysql"] = "http"
    routes: list[RouteConfig] | None = None
    to: str | None = Field(default=None, description="tcp, postgres, mysql: the cluster to forward to")
    http: HttpSettings = HttpSettings()
    app: str | None = Field(
        default=None,
        min_length=1,
        description="http, postgres, mysql: the clients' app, for counting and policy (default: the "
        "instance that owns the client address; for SQL then application_name / program_name, "
        "then the user). Short for identity: {app: ...}",
    )
    identity: IdentityConfig | None = Field(
        default=None, description="http, postgres, mysql: the clients' app, version, instance and node"
    )
    policies: list[str] = Field(
        default_factory=list, description="postgres, mysql: names of policies[] rules, in order"
    )
    tls: TlsConfig | None = Field(
        default=None, description="postgres, mysql: terminate client TLS (cert, key); TLS to the server (upstream)"
    )

    @model_validator(mode="after")
    def _shape(self) -> ListenerConfig:
        if self.protocol not in IDENTITY_PROTOCOLS:
            for key in ("app", "identity"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}' is for http and SQL listeners, not {self.protocol}")
        if self.app is not None and self.identity is not None:
            raise ValueError("give the app in 'app' or in 'identity', not both")
        if self.protocol == "mysql" and self.tls is not None and self.tls.upstream != "disable":
            raise ValueError("tls.upstream: a mysql listener speaks to the server in clear (only 'disable')")
        if self.protocol not in SQL_PROTOCOLS:
            if self.tls is not None:
                raise ValueError(f"'tls' is for SQL listeners (protocol: postgres, mysql), not {self.protocol}")
            if self.policies:
                raise ValueError(f"'policies' is for SQL listeners (protocol: postgres, mysql), not {self.protocol}")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("a policy is listed twice in 'policies'")
        if self.protocol == "http":
            if self.to is not None:
                raise ValueError("an http listener routes with 'routes', not 'to'")
            if not self.routes:
                raise ValueError("an http listener needs at least one route")
        else:
            if self.routes is not None:
                raise ValueError(f"a {self.protocol} listener forwards with 'to', not 'routes'")
            if self.to is None:
                raise ValueError(f"a {self.protocol} listener needs 'to': the cluster to forward to")
        return self

    def source(self) -> Identity | None:
        """The clients' identity when the config fixes it (``app`` or ``identity``)."""
        if self.identity is not None:
            i = self.identity
            return Identity(i.app, i.version, i.instance, i.node)
        return Identity(self.app) if self.app is not None else None

    def clusters(self) -> Iterator[tuple[tuple[str | int, ...], str]]:
        if self.to is not None:
            yield ("to",), self.to
        for i, route in enumerate(self.routes or ()):
            for path, name in route.clusters():
                yield ("routes", i, *path), name


def check_references(
    clusters: dict[str, ClusterConfig], listeners: list[ListenerConfig], policies: Iterable[str] = ()
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every cross-reference problem as (path, reason). ``policies``: the rule names defined."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    rules = set(policies)
    rules_known = ", ".join(sorted(rules)) or "none defined"
    known = ", ".join(sorted(clusters)) or "none defined"
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(listeners):
        if listener.name in names:
            problems.append(
                (
                    ("listeners", i, "name"),
                    f"listener name {listener.name!r} is also used by listeners[{names[listener.name]}]",
                )
            )
        names.setdefault(listener.name, i)
        if listener.listen[1] != 0 and listener.listen in addresses:
            problems.append(
                (
                    ("listeners", i, "listen"),
                    f"{format_address(listener.listen)} is also used by listeners[{addresses[listener.listen]}]",
                )
            )
        addresses.setdefault(listener.listen, i)
        for j, rule in enumerate(listener.policies):
            if rule not in rules:
                problems.append((("listeners", i, "policies", j), f"unknown policy {rule!r} (known: {rules_known})"))
        for path, name in listener.clusters():
            if name not in clusters:
                problems.append((("listeners", i, *path), f"unknown cluster {name!r} (known: {known})"))
    return problems
