"""The discovery section of the config tree: the DNS server and statically declared services.

```yaml
discovery:
  dns: {listen: 127.0.0.1:8053, domain: internal, ttl: 5s, upstreams: [system], allow: [127.0.0.0/8]}
  services:
    - name: db
      instances: [{id: db-1, address: 127.0.0.1, ports: {postgres: 5432}, tags: [primary]}]
```

Models are strict (unknown keys are errors) and every validator raises a sentence a person can
act on; the composition root prefixes it with the path (``discovery.services[0].instances[1]
.address: ...``). ``discovery`` imports no other package, so the small ``Duration`` and
``Address`` parsers live here rather than being shared with ``router.config``.

Names that end up in DNS (domain, service names, instance ids, port names) are checked to be
DNS labels here, once, so the server never has to decide what to do with an unaddressable name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from discovery.model import Instance, Snapshot
from discovery.registry import Registration, check_address
from units import Duration
from units import format_duration as _format_duration

# A DNS label as the registry exposes it: lowercase letters, digits and '-', 1-63 characters,
# not starting or ending with '-' (RFC 1123 host names). Lowercase only, because DNS matching
# is case-insensitive: two services 'Web' and 'web' would be one DNS name.
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_RULE = "lowercase letters, digits and '-', 1-63 characters, not starting or ending with '-'"
MAX_TTL = 2**31 - 1  # RFC 2181 section 8: TTLs are 31-bit


# The JSON schemas say what people write (``5s``, ``127.0.0.1:8053``), not the parsed values,
# so that an editor validating the YAML against pointsman's schema accepts them.


def _parse_ip_port(value: Any, default_port: int | None, why_ip: str) -> tuple[str, int]:
    """``127.0.0.1:53``, ``[::1]:53`` (and, with ``default_port``, ``10.0.0.2`` or ``::1``) ->
    (ip, port). Only IP literals: a DNS server cannot depend on name resolution to start;
    ``why_ip`` says so in the words of the field."""
    if not isinstance(value, str):
        raise ValueError("write a string ip:port, e.g. 127.0.0.1:8053 or [::1]:8053")
    text = value.strip()
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not ip:port (IPv6 is written [::1]:53)")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif ":" in text and default_port is None:
        raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. [::1]:8053")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        where = "" if host == text else f"{value!r}: "
        raise ValueError(f"{where}{host!r} is not an IP address ({why_ip})") from None
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} has no port: write ip:port, e.g. 127.0.0.1:8053")
        return str(ip), default_port
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{value!r}: port {number} is outside 0-65535")
    return str(ip), number


def parse_listen(value: Any) -> tuple[str, int]:
    if isinstance(value, tuple | list) and len(value) == 2:
        value = f"[{value[0]}]:{value[1]}" if ":" in str(value[0]) else f"{value[0]}:{value[1]}"
    return _parse_ip_port(value, None, "the DNS server listens on an address, not a name")


def _parse_upstream(value: Any) -> str:
    if value == "system":
        return "system"
    why = "an upstream is an ip or ip:port, e.g. 10.0.0.2:53, or 'system' for the nameservers of /etc/resolv.conf"
    return format_address(_parse_ip_port(value, 53, why))


def _parse_cidr(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("write a CIDR string, e.g. 10.0.0.0/8")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f"; did you mean {ipaddress.ip_network(value.strip(), strict=False)}?"
        raise ValueError(f"{value!r} is not a CIDR like 10.0.0.0/8 ({exc}){hint}") from None


Upstream = Annotated[str, BeforeValidator(_parse_upstream)]
Cidr = Annotated[str, BeforeValidator(_parse_cidr)]


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


IpPort = Annotated[
    tuple[str, int],
    BeforeValidator(parse_listen),
    PlainSerializer(format_address, return_type=str),
    WithJsonSchema({"type": "string", "description": "ip:port, e.g. 127.0.0.1:8053 or [::1]:8053"}),
]


def _check_label(value: str, what: str) -> str:
    if not _LABEL_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS label: use {_LABEL_RULE}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_allow() -> list[str]:
    return ["127.0.0.0/8", "::1/128"]


def _default_upstreams() -> list[str]:
    return ["system"]


class DnsConfig(Strict):
    """The internal DNS server: answers ``<service>.svc.<domain>`` from the catalog and forwards
    every other name to ``upstreams``, for clients in ``allow`` only."""

    listen: IpPort = Field(description="ip:port for both UDP and TCP; port 0 picks a free one")
    domain: str = Field(default="internal", description="the zone answered from the catalog")
    ttl: Duration = Field(default=5.0, description="TTL of answers, whole seconds")
    negative_ttl: Duration | None = Field(
        default=None, description="TTL of NXDOMAIN/NODATA answers (the SOA minimum); default: ttl"
    )
    upstreams: list[Upstream] = Field(
        default_factory=_default_upstreams,
        description="where other names are forwarded: 'system' (the nameservers of /etc/resolv.conf) "
        "or ip[:port]; empty: names outside the domain are REFUSED",
    )
    upstream_timeout: Duration = Field(default=2.0, description="per upstream try")
    allow: list[Cidr] = Field(
        default_factory=_default_allow, description="CIDRs of the clients served; others are REFUSED"
    )
    tcp_idle_timeout: Duration = Field(default=10.0, description="an idle TCP client connection is closed after this")

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        name = value.strip().rstrip(".").lower()
        if not name:
            raise ValueError("the domain cannot be empty (use e.g. 'internal')")
        for label in name.split("."):
            if not label:
                raise ValueError(f"domain {value!r} has an empty label (two dots in a row)")
            _check_label(label, f"domain {value!r}: label")
        if len(name) > 200:
            raise ValueError(f"domain {value!r} is too long: keep it under 200 characters so service names fit")
        return name

    @field_validator("ttl", "negative_ttl")
    @classmethod
    def _ttl(cls, value: float | None) -> float | None:
        if value is None:
            return value
        if value != int(value):
            raise ValueError(f"DNS TTLs are whole seconds, got {_format_duration(value)}")
        if value > MAX_TTL:
            raise ValueError(f"a DNS TTL is at most {MAX_TTL} seconds")
        return value

    @field_validator("upstream_timeout", "tcp_idle_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    @property
    def negative(self) -> int:
        return int(self.ttl if self.negative_ttl is None else self.negative_ttl)


Health = Literal["passing", "warning", "critical"]


class InstanceConfig(Strict):
    id: str = Field(description="unique within the service; also its DNS name <id>.<service>.svc.<domain>")
    address: str = Field(description="IPv4 or IPv6 address")
    ports: dict[str, int] = Field(default_factory=dict, description="named ports, e.g. {postgres: 5432}")
    tags: list[str] = Field(default_factory=list)
    meta: dict[str, str] = Field(default_factory=dict)
    weight: int = Field(default=1, ge=0, le=65535, description="relative share (SRV weight)")
    health: Health = "passing"

    def registration(self, service: str) -> Registration:
        return Registration(
            id=self.id,
            service=service,
            address=self.address,
            ports=dict(self.ports),
            tags=tuple(self.tags),
            meta=dict(self.meta),
            weight=self.weight,
            source="config",
        )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_label(value, "instance id")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value.strip())

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, int]) -> dict[str, int]:
        for name, port in value.items():
            _check_label(name, "port name")
            if not 1 <= port <= 65535:
                raise ValueError(f"port {name!r}: {port} is outside 1-65535")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not tag:
                raise ValueError("a tag cannot be empty")
        return value


class ServiceConfig(Strict):
    name: str
    instances: list[InstanceConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_label(value, "service name")

    @model_validator(mode="after")
    def _unique_ids(self) -> ServiceConfig:
        seen: dict[str, int] = {}
        for i, instance in enumerate(self.instances):
            if instance.id in seen:
                raise ValueError(f"instances[{i}].id: {instance.id!r} is also used by instances[{seen[instance.id]}]")
            seen[instance.id] = i
        return self


class DiscoveryConfig(Strict):
    dns: DnsConfig | None = Field(default=None, description="the DNS server; absent: no DNS server")
    services: list[ServiceConfig] = Field(default_factory=list, description="services declared in the config")
    state_dir: str | None = Field(default=None, description="where the registry keeps its state")

    @field_validator("services")
    @classmethod
    def _unique_names(cls, value: list[ServiceConfig]) -> list[ServiceConfig]:
        seen: dict[str, int] = {}
        for i, service in enumerate(value):
            if service.name in seen:
                raise ValueError(f"services[{i}].name: {service.name!r} is also used by services[{seen[service.name]}]")
            seen[service.name] = i
        return value

    def registrations(self) -> list[Registration]:
        """The declared instances as the registry stores them (source ``config``)."""
        return [inst.registration(service.name) for service in self.services for inst in service.instances]

    def static_snapshot(self, revision: int = 1) -> Snapshot:
        """The declared services as a catalog snapshot (instances sorted by id, as Snapshot wants),
        for serving DNS without a registry (``python -m discovery.dns``)."""
        services: dict[str, tuple[Instance, ...]] = {}
        for service in self.services:
            services[service.name] = tuple(
                inst.registration(service.name).instance(inst.health)
                for inst in sorted(service.instances, key=lambda i: i.id)
            )
        return Snapshot(revision, services)


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """``path: reason`` per problem, as the composition root prints them (for the standalone
    ``python -m discovery.dns``; ``pointsman`` has its own, with the file name)."""
    out = []
    for error in exc.errors():
        path = prefix
        for part in error["loc"]:
            if isinstance(part, str) and part.startswith(("function-", "tagged-union[")):
                continue  # pydantic's names for validators, not keys of the YAML
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if error["type"] == "extra_forbidden":
            reason = "unknown key"
        elif error["type"] == "missing":
            reason = "required key is missing"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        out.append(f"{path}: {reason}" if path else reason)
    return out
