"""The whole config as one typed tree, loaded from YAML with every error named by its path.

Each component owns the models of its section (``router.config`` for clusters and listeners);
this module assembles them and turns validation failures into :class:`ConfigError` with the
file, the dotted path (``listeners[0].routes[1].split[0].to``) and a reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from discovery.config import DiscoveryConfig
from l7.policy_config import PolicyRule
from pointsman.errors import ConfigError, ConfigProblem
from pointsman.sidecar import SidecarConfig, check_sidecars
from router.config import Address, ClusterConfig, ListenerConfig, check_references
from scheduler.config import JobConfig, NodeConfig, SchedulerConfig, check_declarations


class AdminConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: Address = ("127.0.0.1", 9901)


class Config(BaseModel):
    """The root of a pointsman config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin: AdminConfig = AdminConfig()
    clusters: dict[str, ClusterConfig] = Field(default_factory=dict)
    listeners: list[ListenerConfig] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = Field(
        default=None, description="the service registry and its DNS server (runs when present)"
    )
    policies: list[PolicyRule] = Field(
        default_factory=list, description="SQL statement policies; a SQL listener lists the ones it applies"
    )
    nodes: list[NodeConfig] | None = Field(
        default=None, description="machines jobs are placed on; without it, only this machine (`local`)"
    )
    jobs: list[JobConfig] = Field(default_factory=list, description="workloads the scheduler places on the nodes")
    scheduler: SchedulerConfig | None = Field(default=None, description="placement settings (algorithm)")
    sidecars: list[SidecarConfig] = Field(
        default_factory=list, description="local listeners for apps pointsman does not run (`pointsman sidecar`)"
    )

    def digest(self) -> str:
        """A stable hash of the effective config: equal configs have equal digests."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def format_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _reason(error: dict[str, Any]) -> str:
    msg = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


def _loc(error: dict[str, Any]) -> list[str | int]:
    # Pydantic adds the names of union branches and tagged/functional validators to the
    # location; a person wants the path in their YAML only.
    skip = ("function-after[", "function-before[", "function-plain[", "tagged-union[")
    return [p for p in error["loc"] if not (isinstance(p, str) and p.startswith(skip))]


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigProblem("", "the top level must be a mapping (key: value)")])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [ConfigProblem(format_path(_loc(e)), _reason(e)) for e in exc.errors()]  # type: ignore[arg-type]
        raise ConfigError(source, problems) from None
    names = [rule.name for rule in config.policies]
    problems = [
        ConfigProblem(format_path(path), reason)
        for path, reason in check_references(config.clusters, config.listeners, names)
    ]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            problems.append(
                ConfigProblem(f"policies[{i}].name", f"policy name {name!r} is also used by policies[{seen[name]}]")
            )
        seen.setdefault(name, i)
    problems.extend(
        ConfigProblem(format_path(path), reason) for path, reason in check_declarations(config.nodes, config.jobs)
    )
    for i, job in enumerate(config.jobs):
        for k, upstream in enumerate(job.upstreams):
            for m, name in enumerate(upstream.policies):
                if name not in seen:
                    known = ", ".join(names) or "none"
                    problems.append(
                        ConfigProblem(f"jobs[{i}].upstreams[{k}].policies[{m}]", f"unknown policy {name!r} ({known})")
                    )
    problems.extend(ConfigProblem(path, reason) for path, reason in check_sidecars(config.sidecars, names))
    if problems:
        raise ConfigError(source, problems)
    return config


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans, which
    would turn the key ``on:`` of ``retries`` into ``True``."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """YAML as config files are read (1.2 booleans); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Yaml12Loader)


def load_text(text: str, source: str = "<config>") -> Config:
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigProblem("", f"{where}YAML syntax error: {problem}")]) from None
    return parse_config(data, source)


def load_file(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read the file: {exc.strerror or exc}")]) from None
    return load_text(text, str(path))


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pointsman config"
    return schema
