"""The config as a user meets it: example files load, mistakes are named by file, path and reason."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from pointsman.config import _Yaml12Loader, json_schema, load_file, load_text
from pointsman.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def _problems(text: str, source: str = "test.yaml") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, source)
    assert caught.value.source == source
    return [(p.path, p.reason) for p in caught.value.problems]


def test_there_are_example_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "example.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    config = load_file(path)
    assert config.listeners, "an example without listeners shows nothing"
    # The digest is stable: loading twice gives the same hash (reloads rely on it).
    assert load_file(path).digest() == config.digest()


def test_unknown_cluster_in_a_split_names_path_and_cluster() -> None:
    problems = _problems(
        """
clusters: {web: {endpoints: [127.0.0.1:1]}}
listeners:
  - name: public
    listen: 127.0.0.1:8080
    routes:
      - {match: {path_prefix: /a}, to: web}
      - {match: {path_prefix: /}, split: [{to: nope, weight: 1}, {to: web, weight: 1}]}
"""
    )
    assert len(problems) == 1
    path, reason = problems[0]
    assert path == "listeners[0].routes[1].split[0].to"
    assert "'nope'" in reason
    assert "web" in reason  # the clusters that do exist


def test_every_problem_is_reported_not_only_the_first() -> None:
    problems = _problems(
        """
clusters: {web: {endpoints: ["localhost"]}}
listeners: [{name: a, listen: "127.0.0.1:99999", to: web, protocol: tcp}]
"""
    )
    assert [p for p, _ in problems] == ["clusters.web.endpoints[0]", "listeners[0].listen"]
    assert "host:port" in problems[0][1]
    assert "99999" in problems[1][1] and "0-65535" in problems[1][1]


def test_bad_duration() -> None:
    [(path, reason)] = _problems("clusters: {web: {endpoints: [127.0.0.1:1], connect_timeout: 5 parsecs}}")
    assert path == "clusters.web.connect_timeout"
    assert "'5 parsecs' is not a duration" in reason


def test_unknown_key_is_an_error_not_ignored() -> None:
    assert _problems("clusters: {web: {endpoints: [127.0.0.1:1], balancr: random}}") == [
        ("clusters.web.balancr", "unknown key")
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    [(path, reason)] = _problems("clusters:\n  web: {endpoints: [127.0.0.1:1]\nlisteners: []\n")
    assert path == ""
    assert reason.startswith("line 3, column 1: YAML syntax error")


def test_retries_on_key_stays_a_string() -> None:
    # YAML 1.1 reads `on` as the boolean true; the loader must not.
    config = load_text(
        """
clusters: {web: {endpoints: [127.0.0.1:1]}}
listeners:
  - name: a
    listen: 127.0.0.1:8080
    routes:
      - to: web
        retries: {attempts: 2, on: [5xx, reset]}
"""
    )
    retries = config.listeners[0].routes[0].retries  # type: ignore[index]
    assert retries is not None
    assert retries.on == ["5xx", "reset"]


def test_duplicate_listener_names_and_addresses() -> None:
    problems = _problems(
        """
clusters: {web: {endpoints: [127.0.0.1:1]}}
listeners:
  - {name: a, listen: 127.0.0.1:8080, protocol: tcp, to: web}
  - {name: a, listen: 127.0.0.1:8081, protocol: tcp, to: web}
  - {name: b, listen: 127.0.0.1:8080, protocol: tcp, to: web}
  - {name: c, listen: 127.0.0.1:0, protocol: tcp, to: web}
  - {name: d, listen: 127.0.0.1:0, protocol: tcp, to: web}
"""
    )
    # Port 0 means "any free port": two listeners may both ask for one.
    assert problems == [
        ("listeners[1].name", "listener name 'a' is also used by listeners[0]"),
        ("listeners[2].listen", "127.0.0.1:8080 is also used by listeners[0]"),
    ]


def test_error_renders_file_path_and_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("admin: {listen: nowhere}\n", "site.yaml")
    rendered = caught.value.render()
    assert rendered.splitlines()[0] == "site.yaml: invalid config (1 problem)"
    assert "  site.yaml: admin.listen: 'nowhere' is not host:port" in rendered
    assert caught.value.as_dict()["file"] == "site.yaml"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_file(missing)
    assert caught.value.source == str(missing)
    assert "cannot read the file" in caught.value.problems[0].reason


def test_schema_is_valid_json_schema() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == "pointsman config"
    assert set(schema["properties"]) == {
        "admin",
        "clusters",
        "discovery",
        "jobs",
        "listeners",
        "nodes",
        "policies",
        "scheduler",
        "sidecars",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate_against_the_schema(path: Path) -> None:
    # What an editor with the schema sees: the raw YAML (read as YAML 1.2, like pointsman).
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Yaml12Loader)
    jsonschema.Draft202012Validator(json_schema()).validate(data)


def test_schema_rejects_what_the_loader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    assert not validator.is_valid({"clusters": {"web": {"endpoints": ["127.0.0.1:1"], "balancr": "random"}}})
    assert not validator.is_valid({"clusters": {"web": {"endpoints": []}}})
    assert not validator.is_valid({"listeners": [{"name": "bad name!", "listen": "127.0.0.1:1", "to": "x"}]})


def test_listener_keys_that_do_not_fit_its_protocol() -> None:
    base = "clusters: {db: {endpoints: [127.0.0.1:1]}}\nlisteners:\n"
    cases = [
        ("  - {name: a, listen: 127.0.0.1:0, protocol: tcp, to: db, app: x}", "'app' is for http and SQL listeners"),
        (
            "  - {name: a, listen: 127.0.0.1:0, protocol: mysql, to: db, app: x, identity: {app: y}}",
            "give the app in 'app' or in 'identity', not both",
        ),
        (
            "  - {name: a, listen: 127.0.0.1:0, protocol: mysql, to: db, tls: {upstream: require}}",
            "a mysql listener speaks to the server in clear",
        ),
        ("  - {name: a, listen: 127.0.0.1:0, protocol: tcp, to: db, policies: [p]}", "'policies' is for SQL listeners"),
        (
            "  - {name: a, listen: 127.0.0.1:0, routes: [{to: db, match: {apps: []}}]}",
            "apps: give at least one non-empty pattern",
        ),
    ]
    for listener, expected in cases:
        [(path, reason)] = _problems(base + listener + "\n")
        assert path.startswith("listeners[0]"), (listener, path)
        assert expected in reason, (listener, reason)
