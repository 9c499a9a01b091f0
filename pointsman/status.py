"""``pointsman status``: a running instance at a glance, read from its admin API.

* :func:`fetch` makes the GET requests (stdlib, blocking); an API the instance does not
  serve (404: no scheduler, no discovery, no router) is None.
* :func:`summarize` turns those answers into the one object ``--json`` prints:
  ``{jobs, allocations, services, listeners, clusters, reload}``, None where not running.
* :func:`render` turns that object into aligned text, one section per heading.

The last two are pure, so that tests give them literal dicts.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from pointsman.errors import AdminError
from router.config import format_address

# What summarize() reads, and where the admin API serves it.
PATHS = {
    "status": "/status",
    "config": "/config",
    "clusters": "/clusters",
    "jobs": "/jobs",
    "allocations": "/allocations",
    "services": "/v1/services",
}
NOT_RUNNING = "(not running)"


def fetch(address: tuple[str, int], timeout: float = 5.0) -> dict[str, Any]:
    """Every answer in :data:`PATHS` by key, None for a 404. ``address`` is connectable (not
    a wildcard). Anything else that fails is an :class:`AdminError` on one line."""
    answers: dict[str, Any] = {}
    for key, path in PATHS.items():
        url = f"http://{format_address(address)}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                answers[key] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code != 404 or key == "config":
                raise AdminError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            answers[key] = None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise AdminError(f"{url}: cannot reach the admin API: {getattr(exc, 'reason', exc)}") from None
    return answers


# -- the summary (what --json prints) -------------------------------------------------------


def summarize(answers: Mapping[str, Any]) -> dict[str, Any]:
    jobs, allocs, services = answers.get("jobs"), answers.get("allocations"), answers.get("services")
    clusters = answers.get("clusters")
    config = (answers.get("config") or {}).get("config") or {}
    status = answers.get("status")
    return {
        "jobs": None if jobs is None else [_job(j) for j in sorted(jobs["jobs"], key=lambda j: j["name"])],
        "allocations": None if jobs is None or allocs is None else [_alloc(a) for a in allocs["allocations"]],
        "services": None if services is None else _services(services["services"]),
        "listeners": None if clusters is None else _listeners(config.get("listeners", []), status),
        "clusters": None if clusters is None else _clusters(clusters, config.get("clusters", {})),
        "reload": _reload(status, answers.get("config")),
    }


def _job(job: Mapping[str, Any]) -> dict[str, Any]:
    unplaced = job.get("unplaced")
    return {
        **{key: job.get(key) for key in ("name", "version", "count", "running", "healthy", "restarts")},
        "unplaced": None if not unplaced else f"{unplaced['count']}: {unplaced['reason']}",
    }


def _alloc(alloc: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("id", "job", "version", "index", "node", "status", "health", "address", "ports", "restarts")
    return {**{key: alloc.get(key) for key in keys}, "last_exit": alloc.get("last_exit") or None}


def _services(services: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    keys = ("id", "address", "ports", "health", "node", "version")
    return [
        {"service": name, **{key: instance.get(key) for key in keys}}
        for name in sorted(services)
        for instance in sorted(services[name], key=lambda i: str(i.get("id")))
    ]


def _listeners(listeners: Sequence[Mapping[str, Any]], status: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    bound = (status or {}).get("listeners") or {}
    out = []
    for listener in listeners:
        targets = [listener["to"]] if listener.get("to") else []
        for route in listener.get("routes") or []:
            targets += [route["to"]] if route.get("to") else [split["to"] for split in route.get("split") or []]
        out.append(
            {
                "name": listener["name"],
                "protocol": listener.get("protocol", "http"),
                # The bound address (GET /status) when known: `listen` may ask for port 0.
                "address": bound.get(listener["name"], listener.get("listen")),
                "clusters": list(dict.fromkeys(targets)),
            }
        )
    return out


def _clusters(snapshot: Mapping[str, Any], configs: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in sorted(snapshot):
        config = configs.get(name) or {}
        endpoints = snapshot[name].get("endpoints", [])
        out.append(
            {
                "name": name,
                "service": f"{config['service']}:{config.get('port')}" if config.get("service") else None,
                "balancer": snapshot[name].get("balancer"),
                "healthy": sum(1 for e in endpoints if e.get("healthy") and not e.get("ejected")),
                "endpoints": [
                    {key: e.get(key) for key in ("address", "healthy", "ejected", "ejected_for", "active_requests")}
                    for e in endpoints
                ],
            }
        )
    return out


def _reload(status: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> dict[str, Any]:
    if status is None:  # an instance older than GET /status: the running hash only
        return {"state": None, "file": (config or {}).get("file"), "hash": (config or {}).get("hash"), "last": None}
    return {key: status.get(key) for key in ("state", "file", "hash")} | {"last": status.get("last_reload")}


# -- the text --------------------------------------------------------------------------------


def render(summary: Mapping[str, Any], *, admin: str = "") -> str:
    """The text of ``pointsman status`` (no trailing newline). Pure."""
    lines = [f"pointsman status - admin {admin}" if admin else "pointsman status"]
    lines += ["", "RELOAD", *_reload_lines(summary.get("reload"))]
    sections = (
        ("JOBS", _job_table),
        ("ALLOCATIONS", _alloc_table),
        ("SERVICES", _service_table),
        ("LISTENERS", _listener_table),
        ("CLUSTERS", _cluster_table),
    )
    for title, table in sections:
        rows = summary.get(title.lower())
        lines += ["", title, *(table(rows) if rows is not None else [NOT_RUNNING])]
    return "\n".join(lines)


def _reload_lines(reload: Mapping[str, Any] | None) -> list[str]:
    if not reload:
        return ["(unknown)"]
    lines = [f"state {reload.get('state') or '-'}, config hash {reload.get('hash')}", f"file {reload.get('file')}"]
    last = reload.get("last")
    if not last:
        return [*lines, "last reload: none since start"]
    what = f"{last.get('status')} at {last.get('at')} ({last.get('source')})"
    lines.append(f"last reload: {what}, hash {last.get('hash')}")
    for error in last.get("errors") or []:
        where = f"{error.get('path')}: " if error.get("path") else ""
        lines.append(f"  {last.get('file', '')}: {where}{error.get('reason')}")
    return lines


def _job_table(jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ("NAME", "VERSION", "COUNT", "RUNNING", "HEALTHY", "RESTARTS", "UNPLACED")
    keys = ("name", "version", "count", "running", "healthy", "restarts", "unplaced")
    return _table(columns, [[_cell(job.get(key)) for key in keys] for job in jobs], "no jobs")


def _alloc_table(allocs: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ("ID", "JOB", "VER", "IDX", "NODE", "STATUS", "HEALTH", "ADDRESS", "RESTARTS")
    rows, notes = [], {}
    for a in allocs:
        keys = ("id", "job", "version", "index", "node", "status", "health")
        rows.append([*(_cell(a.get(key)) for key in keys), _where(a), _cell(a.get("restarts"))])
        if a.get("last_exit"):
            # On a line of its own: exit messages are long, and the table stays narrow.
            notes[len(rows) - 1] = f"  last exit: {a['last_exit']}"
    table = _table(columns, rows, "no allocations")
    out = table[:1]
    for i, line in enumerate(table[1:]):
        out += [line, notes[i]] if i in notes else [line]
    return out


_SERVICE_KEYS = ("health", "node", "version")


def _service_table(instances: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ("SERVICE", "ID", "ADDRESS", "HEALTH", "NODE", "VERSION")
    rows = [
        [_cell(i.get("service")), _cell(i.get("id")), _where(i), *(_cell(i.get(key)) for key in _SERVICE_KEYS)]
        for i in instances
    ]
    return _table(columns, rows, "no instances registered")


def _listener_table(listeners: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ("NAME", "PROTOCOL", "ADDRESS", "CLUSTERS")
    rows = [
        [_cell(lst.get(key)) for key in ("name", "protocol", "address")] + [", ".join(lst.get("clusters") or []) or "-"]
        for lst in listeners
    ]
    return _table(columns, rows, "no listeners")


def _cluster_table(clusters: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = ("CLUSTER", "FROM", "HEALTHY", "ENDPOINT", "HEALTH", "ACTIVE")
    rows = []
    for c in clusters:
        head = [_cell(c.get("name")), _cell(c.get("service") or "endpoints")]
        head.append(f"{c.get('healthy')}/{len(c.get('endpoints') or [])}")
        for i, e in enumerate(c.get("endpoints") or []):
            health = "healthy" if e.get("healthy") else "unhealthy"
            if e.get("ejected"):
                health = f"ejected ({e.get('ejected_for')}s left)"
            # The cluster's own cells on its first endpoint only.
            cells = head if i == 0 else ["", "", ""]
            rows.append([*cells, _cell(e.get("address")), health, _cell(e.get("active_requests"))])
        if not c.get("endpoints"):
            rows.append([*head, "-", "no endpoints", "-"])
    return _table(columns, rows, "no clusters")


def _where(row: Mapping[str, Any]) -> str:
    """``127.0.0.1 http=20001 admin=20002``: the address and its named ports."""
    ports = " ".join(f"{name}={port}" for name, port in (row.get("ports") or {}).items())
    return " ".join(part for part in (str(row.get("address") or "-"), ports) if part)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> list[str]:
    """Left-aligned columns, two spaces apart; ``empty`` under the heading when no rows."""
    if not rows:
        return ["  ".join(columns), empty]
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) for i in range(len(columns))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in (columns, *rows)
    ]
