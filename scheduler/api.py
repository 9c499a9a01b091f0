"""The scheduler's HTTP API, served by the admin server (JSON).

GET    /jobs                          every job: version, count, running, healthy, unplaced
GET    /jobs/{name}                   one job and its allocations
POST   /jobs                          add or replace a job (body: one job as in `jobs:`,
                                      JSON or YAML); 400 names the field, 409 for a job
                                      the config file declares (edit the file instead)
DELETE /jobs/{name}                   remove a job added through the API (its instances stop)
GET    /allocations[?job=&ended=1]    allocations by job and index (ended: recent ones too)
GET    /allocations/{id}              one allocation (id or a unique prefix)
GET    /allocations/{id}/logs         ?stream=stdout|stderr&tail=BYTES (default 64 KiB) or
                                      &offset=N (from byte N: how `logs -f` follows);
                                      X-Pointsman-Log-Size gives the file's size
GET    /nodes                         nodes with status, capacity and what runs there
POST   /nodes/{name}                  {"status": "draining" | "down" | "ready" | null}: drain
                                      a node or mark it lost; its allocations are re-placed
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web
from pydantic import ValidationError

from scheduler.config import JobConfig, check_declarations
from scheduler.reconciler import Reconciler
from scheduler.records import Alloc

DEFAULT_TAIL = 64 * 1024


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bad(errors: list[dict[str, str]], status: int = 400) -> web.Response:
    return web.json_response({"errors": errors}, status=status)


def describe_jobs(reconciler: Reconciler) -> list[dict[str, Any]]:
    """GET /jobs: every job with its counts (running, healthy, unplaced) and versions."""
    out = []
    live = reconciler.live()
    for name, entry in reconciler.jobs.items():
        allocs = [a for a in live if a.job == name]
        unplaced = reconciler.unplaced.get(name)
        out.append(
            {
                "name": name,
                "version": entry.config.version,
                "driver": entry.config.driver,
                "source": entry.source,
                "count": entry.config.count,
                "running": sum(1 for a in allocs if a.status == "running"),
                "healthy": sum(1 for a in allocs if a.health == "passing"),
                "versions": sorted({a.version for a in allocs}),
                "restarts": reconciler.restarts_total.get(name, 0),
                "unplaced": None if unplaced is None else {"count": unplaced.count, "reason": unplaced.explanation},
            }
        )
    return out


def describe_allocs(reconciler: Reconciler, job: str | None = None, *, ended: bool = False) -> list[dict[str, Any]]:
    """Live allocations by job and index; with `ended`, also the recent ones that ended."""
    allocs = [*reconciler.allocs.values(), *(reconciler.history if ended else ())]
    allocs.sort(key=lambda a: (a.job, a.index, a.created_at))
    return [a.describe() for a in allocs if job is None or a.job == job]


def find_alloc(reconciler: Reconciler, alloc_id: str) -> Alloc | None:
    """A live or recently ended allocation by id, or by a unique prefix of it."""
    candidates = [*reconciler.allocs.values(), *reconciler.history]
    exact = [a for a in candidates if a.id == alloc_id]
    if exact:
        return exact[-1]
    matches = {a.id: a for a in candidates if a.id.startswith(alloc_id)}
    return next(iter(matches.values())) if len(matches) == 1 else None


def scheduler_routes(get: Callable[[], Reconciler]) -> list[web.RouteDef]:
    """The routes; `get()` returns the running reconciler (routes are built before it starts)."""

    def alloc_or_404(request: web.Request) -> Alloc:
        alloc = find_alloc(get(), request.match_info["id"])
        if alloc is None:
            reason = "no such allocation (or the prefix is ambiguous)"
            raise web.HTTPNotFound(
                text=json.dumps({"errors": [{"path": "id", "reason": reason}]}), content_type="application/json"
            )
        return alloc

    async def jobs(request: web.Request) -> web.Response:
        reconciler = get()
        return web.json_response({"jobs": describe_jobs(reconciler)})

    async def job(request: web.Request) -> web.Response:
        reconciler = get()
        name = request.match_info["name"]
        found = [j for j in describe_jobs(reconciler) if j["name"] == name]
        if not found:
            return _bad([{"path": "name", "reason": f"no job {name!r}"}], 404)
        return web.json_response({**found[0], "allocations": describe_allocs(reconciler, name)})

    async def submit(request: web.Request) -> web.Response:
        reconciler = get()
        text = await request.text()
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as exc:
            return _bad([{"path": "", "reason": f"not JSON or YAML: {exc}"}])
        try:
            config = JobConfig.model_validate(data)
        except ValidationError as exc:
            return _bad(
                [
                    {
                        "path": _path(tuple(e["loc"])),
                        "reason": "unknown field"
                        if e["type"] == "extra_forbidden"
                        else str(e["msg"]).removeprefix("Value error, "),
                    }
                    for e in exc.errors()
                ]
            )
        existing = reconciler.jobs.get(config.name)
        if existing is not None and existing.source == "config":
            reason = f"job {config.name!r} is declared in the config file; edit it there"
            return _bad([{"path": "name", "reason": reason}], 409)
        others = [e.config for name, e in reconciler.jobs.items() if name != config.name]
        problems = [
            {"path": _path(path[2:]), "reason": reason}
            for path, reason in check_declarations(reconciler.node_configs, [*others, config])
            if path[:2] == ("jobs", len(others))
        ]
        if problems:
            return _bad(problems)
        await reconciler.submit(config)
        await reconciler.reconcile()
        found = [j for j in describe_jobs(reconciler) if j["name"] == config.name]
        return web.json_response(found[0], status=200 if existing is not None else 201)

    async def remove(request: web.Request) -> web.Response:
        reconciler = get()
        name = request.match_info["name"]
        entry = reconciler.jobs.get(name)
        if entry is None:
            return _bad([{"path": "name", "reason": f"no job {name!r}"}], 404)
        if entry.source == "config":
            reason = f"job {name!r} is declared in the config file; remove it there"
            return _bad([{"path": "name", "reason": reason}], 409)
        await reconciler.remove(name)
        await reconciler.reconcile()
        return web.json_response({"removed": name})

    async def allocations(request: web.Request) -> web.Response:
        reconciler = get()
        ended = request.query.get("ended", "") in ("1", "true", "yes")
        return web.json_response({"allocations": describe_allocs(reconciler, request.query.get("job"), ended=ended)})

    async def allocation(request: web.Request) -> web.Response:
        return web.json_response(alloc_or_404(request).describe())

    async def logs(request: web.Request) -> web.StreamResponse:
        reconciler = get()
        alloc = alloc_or_404(request)
        stream = request.query.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            return _bad([{"path": "stream", "reason": "stdout or stderr"}])
        try:
            tail = int(request.query.get("tail", DEFAULT_TAIL))
            offset = int(request.query["offset"]) if "offset" in request.query else None
        except ValueError:
            return _bad([{"path": "tail/offset", "reason": "not an integer"}])
        paths = reconciler.log_paths(alloc)
        if paths is None:
            return _bad([{"path": "id", "reason": f"driver {alloc.config.driver} is not running here"}], 404)
        path = paths[0] if stream == "stdout" else paths[1]
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if offset is not None:
                    f.seek(min(max(offset, 0), size))
                else:
                    f.seek(max(0, size - tail) if tail > 0 else 0)
                body = f.read(size - f.tell())
        except FileNotFoundError:
            body, size = b"", 0
        return web.Response(body=body, content_type="text/plain", headers={"X-Pointsman-Log-Size": str(size)})

    async def nodes(request: web.Request) -> web.Response:
        reconciler = get()
        live = reconciler.live()
        out = []
        for node in reconciler.nodes():
            here = [a for a in live if a.node == node.name]
            out.append(
                {
                    "name": node.name,
                    "status": node.status,
                    "attributes": node.attributes,
                    "drivers": sorted(node.drivers),
                    "capacity": {"cpu": node.capacity.cpu, "memory": node.capacity.memory},
                    "allocated": {"cpu": sum(a.cpu for a in here), "memory": sum(a.memory for a in here)},
                    "allocations": [a.id for a in here],
                }
            )
        return web.json_response({"nodes": out})

    async def set_node(request: web.Request) -> web.Response:
        reconciler = get()
        name = request.match_info["name"]
        if name not in {n.name for n in reconciler.node_configs}:
            return _bad([{"path": "name", "reason": f"no node {name!r}"}], 404)
        try:
            body = await request.json()
        except ValueError:
            return _bad([{"path": "", "reason": "expected a JSON object"}])
        status = body.get("status") if isinstance(body, dict) else "?"
        if status not in ("ready", "draining", "down", None):
            return _bad([{"path": "status", "reason": "one of ready, draining, down, or null for the config's"}])
        reconciler.set_node_status(name, status)
        await reconciler.reconcile()
        return web.json_response({"name": name, "status": next(n.status for n in reconciler.nodes() if n.name == name)})

    return [
        web.get("/jobs", jobs),
        web.post("/jobs", submit),
        web.get("/jobs/{name}", job),
        web.delete("/jobs/{name}", remove),
        web.get("/allocations", allocations),
        web.get("/allocations/{id}", allocation),
        web.get("/allocations/{id}/logs", logs),
        web.get("/nodes", nodes),
        web.post("/nodes/{name}", set_node),
    ]
