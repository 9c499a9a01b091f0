"""The discovery config section: defaults, normalisation and the message of every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from discovery.config import DiscoveryConfig, DnsConfig, describe_errors

EXAMPLE = """
discovery:
  dns: {listen: 127.0.0.1:8053, domain: internal, ttl: 5s, upstreams: [system], allow: [127.0.0.0/8]}
  services:
    - name: db
      instances: [{id: db-1, address: 127.0.0.1, ports: {postgres: 5432}, tags: [primary], meta: {k: v}}]
"""


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        DiscoveryConfig.model_validate(data)
    return describe_errors(info.value, prefix="discovery")


def test_the_issue_example_loads() -> None:
    config = DiscoveryConfig.model_validate(yaml.safe_load(EXAMPLE)["discovery"])
    assert config.dns is not None
    assert config.dns.listen == ("127.0.0.1", 8053)
    assert config.dns.ttl == 5.0
    assert config.dns.negative == 5  # defaults to ttl
    assert config.dns.upstreams == ["system"]
    assert config.state_dir is None
    snap = config.static_snapshot()
    (db1,) = snap.instances("db")
    assert (db1.id, db1.service, db1.address, dict(db1.ports), db1.tags, dict(db1.meta)) == (
        "db-1",
        "db",
        "127.0.0.1",
        {"postgres": 5432},
        ("primary",),
        {"k": "v"},
    )
    assert (db1.weight, db1.health) == (1, "passing")


def test_defaults_and_normalisation() -> None:
    dns = DnsConfig.model_validate(
        {"listen": "[::1]:53", "domain": "Corp.Example.", "negative_ttl": "1m", "upstreams": ["10.0.0.2", "[::1]"]}
    )
    assert dns.listen == ("::1", 53)
    assert dns.domain == "corp.example"
    assert dns.negative == 60
    assert dns.upstreams == ["10.0.0.2:53", "[::1]:53"]
    assert dns.allow == ["127.0.0.0/8", "::1/128"]
    assert dns.upstream_timeout == 2.0
    assert dns.model_dump(mode="json")["listen"] == "[::1]:53"


@pytest.mark.parametrize(
    ("dns", "expected"),
    [
        ({}, "discovery.dns.listen: required key is missing"),
        ({"listen": "localhost:53"}, "is not an IP address"),
        ({"listen": "127.0.0.1"}, "has no port"),
        ({"listen": "::1:53"}, "write IPv6 addresses in brackets"),
        ({"listen": "127.0.0.1:70000"}, "port 70000 is outside 0-65535"),
        ({"listen": "127.0.0.1:0", "ttl": "500ms"}, "discovery.dns.ttl: DNS TTLs are whole seconds, got 500ms"),
        ({"listen": "127.0.0.1:0", "ttl": "soon"}, "'soon' is not a duration"),
        ({"listen": "127.0.0.1:0", "upstream_timeout": 0}, "discovery.dns.upstream_timeout: must be greater than zero"),
        ({"listen": "127.0.0.1:0", "domain": "bad_domain"}, "is not a DNS label"),
        ({"listen": "127.0.0.1:0", "domain": ""}, "the domain cannot be empty"),
        (
            {"listen": "127.0.0.1:0", "upstreams": ["dns.google"]},
            "discovery.dns.upstreams[0]: 'dns.google' is not an IP address",
        ),
        ({"listen": "127.0.0.1:0", "allow": ["10.0.0.1/8"]}, "did you mean 10.0.0.0/8?"),
        ({"listen": "127.0.0.1:0", "allow": ["everyone"]}, "discovery.dns.allow[0]: 'everyone' is not a CIDR"),
        ({"listen": "127.0.0.1:0", "ttl": "5s", "tll": 3}, "discovery.dns.tll: unknown key"),
    ],
)
def test_dns_mistakes(dns: dict[str, Any], expected: str) -> None:
    found = problems({"dns": dns})
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ({"name": "Web"}, "discovery.services[0].name: service name 'Web' is not a DNS label"),
        ({"name": "-web"}, "is not a DNS label"),
        ({"name": "web", "instances": [{"id": "w_1", "address": "10.0.0.1"}]}, "instances[0].id: instance id 'w_1'"),
        ({"name": "web", "instances": [{"id": "w1", "address": "10.0.0.300"}]}, "'10.0.0.300' is not an IPv4 or IPv6"),
        ({"name": "web", "instances": [{"id": "w1"}]}, "discovery.services[0].instances[0].address: required key"),
        (
            {"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1", "ports": {"http": 0}}]},
            "port 'http': 0 is outside 1-65535",
        ),
        (
            {"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1", "ports": {"HTTP": 80}}]},
            "port name 'HTTP' is not a DNS label",
        ),
        (
            {"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1", "health": "ok"}]},
            "discovery.services[0].instances[0].health: Input should be 'passing', 'warning' or 'critical'",
        ),
        (
            {"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1", "weight": -1}]},
            "weight: Input should be greater than or equal to 0",
        ),
        (
            {"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1"}, {"id": "w1", "address": "10.0.0.2"}]},
            "instances[1].id: 'w1' is also used by instances[0]",
        ),
        ({"name": "web", "instances": [{"id": "w1", "address": "10.0.0.1", "tags": [""]}]}, "a tag cannot be empty"),
    ],
)
def test_service_mistakes(service: dict[str, Any], expected: str) -> None:
    found = problems({"services": [service]})
    assert any(expected in p for p in found), found


def test_duplicate_service_names() -> None:
    found = problems({"services": [{"name": "db"}, {"name": "web"}, {"name": "db"}]})
    assert found == ["discovery.services: services[2].name: 'db' is also used by services[0]"]


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"dns": {"listen": "nowhere", "ttl": "1.5s"}, "services": [{"name": "x", "oops": 1}]})
    assert len(found) == 3, found


def test_address_is_normalised() -> None:
    config = DiscoveryConfig.model_validate(
        {"services": [{"name": "db", "instances": [{"id": "db-1", "address": "FD00:0::1"}]}]}
    )
    assert config.static_snapshot().instances("db")[0].address == "fd00::1"


def test_standalone_server_reports_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"discovery": {"dns": {"listen": "127.0.0.1:0", "ttl": "2.5s"}}}))
    result = subprocess.run(
        [sys.executable, "-m", "discovery.dns", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"{path}: discovery.dns.ttl: DNS TTLs are whole seconds, got 2.5s" in result.stderr
    path.write_text("admin: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "discovery.dns", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "no 'discovery' section" in result.stderr


def test_json_schema_accepts_what_people_write() -> None:
    """Editors validate YAML against the schema: durations and addresses are strings there."""
    schema = DiscoveryConfig.model_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(EXAMPLE)["discovery"], schema)
    dumped = DiscoveryConfig.model_validate(yaml.safe_load(EXAMPLE)["discovery"]).model_dump(mode="json")
    assert dumped["dns"]["listen"] == "127.0.0.1:8053"
    assert dumped["dns"]["ttl"] == "5s"
    jsonschema.validate(dumped, schema)
