"""The registry's HTTP API, served by the admin server (JSON).

    GET    /v1/services                         every service with its instances and health
    GET    /v1/services/{service}               one service (empty list when unknown)
           ?index=N&wait=30s                    blocking query: answer once the revision > N
    PUT    /v1/services/{service}/instances/{id}            register (body: the instance)
    DELETE /v1/services/{service}/instances/{id}            deregister
    PUT    /v1/services/{service}/instances/{id}/heartbeat  renew a ttl check
                                                            (body optional: {status, output})
    GET    /v1/watch?index=N                    server-sent events: the catalog after each change

Every answer carries ``X-Pointsman-Index`` (the registry revision it reflects), as Consul's
``X-Consul-Index``: a client passes it back as ``index`` to wait for the next change.
Validation errors are 400 with ``{"errors": [{"path": "ports.http", "reason": ...}]}``.
A register or deregister answers once the catalog shows it (read your writes: a DNS query or a
request through the router right after the 200 already sees the change).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from discovery.model import Health
from discovery.registry import Registration, Registry

INDEX_HEADER = "X-Pointsman-Index"
MAX_WAIT = 300.0


def _errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        elif error["type"] == "missing":
            reason = "required field is missing"
        out.append({"path": path, "reason": reason})
    return out


def _bad(errors: list[dict[str, str]]) -> web.Response:
    return web.json_response({"errors": errors}, status=400)


def _wait_param(request: web.Request) -> tuple[int | None, float]:
    index = request.query.get("index")
    wait = request.query.get("wait", "30s")
    try:
        seconds = float(wait[:-2]) / 1000 if wait.endswith("ms") else float(wait.rstrip("s"))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"errors": [{"path": "wait", "reason": "not a duration"}]})) from None
    if index is None:
        return None, 0.0
    try:
        return int(index), min(max(seconds, 0.0), MAX_WAIT)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"errors": [{"path": "index", "reason": "not an integer"}]})) from None


def registry_routes(registry: Registry) -> list[web.RouteDef]:
    async def read(request: web.Request, service: str | None) -> web.Response:
        index, wait = _wait_param(request)
        if index is not None:
            await registry.wait_for_change(index, wait)
        body = registry.describe(service)
        return web.json_response(body, headers={INDEX_HEADER: str(body["revision"])})

    async def services(request: web.Request) -> web.Response:
        return await read(request, None)

    async def service(request: web.Request) -> web.Response:
        return await read(request, request.match_info["service"])

    async def register(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _bad([{"path": "", "reason": "the body is not JSON"}])
        if not isinstance(body, dict):
            return _bad([{"path": "", "reason": "the body must be a JSON object"}])
        for field in ("service", "id"):
            given = body.get(field)
            if given is not None and given != request.match_info[field]:
                return _bad([{"path": field, "reason": "differs from the URL"}])
        body = {**body, "service": request.match_info["service"], "id": request.match_info["id"]}
        body.setdefault("source", "api")
        try:
            reg = Registration.model_validate(body)
        except ValidationError as exc:
            return _bad(_errors(exc))
        revision = await registry.register(reg)
        # Read your writes: answer once the catalog (DNS, the router) shows the registration.
        await registry.wait_for_change(revision - 1, 1.0)
        return web.json_response({"revision": revision}, headers={INDEX_HEADER: str(revision)})

    async def deregister(request: web.Request) -> web.Response:
        found = await registry.deregister(request.match_info["service"], request.match_info["id"])
        if not found:
            return web.json_response({"errors": [{"path": "id", "reason": "no such instance"}]}, status=404)
        await registry.wait_for_change(registry.store.revision - 1, 1.0)
        return web.json_response({"deregistered": True})

    async def heartbeat(request: web.Request) -> web.Response:
        status: Health = "passing"
        output = ""
        if request.can_read_body:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _bad([{"path": "", "reason": "the body is not JSON"}])
            if not isinstance(body, dict):
                return _bad([{"path": "", "reason": "the body must be a JSON object"}])
            given = body.get("status", "passing")
            output = str(body.get("output", ""))
            if given not in ("passing", "warning", "critical"):
                return _bad([{"path": "status", "reason": "one of passing, warning, critical"}])
            status = given
        try:
            await registry.heartbeat(request.match_info["service"], request.match_info["id"], status, output)
        except KeyError:
            return web.json_response({"errors": [{"path": "id", "reason": "no such instance"}]}, status=404)
        except ValueError as exc:
            return _bad([{"path": "check", "reason": str(exc)}])
        return web.json_response({"status": status})

    async def watch(request: web.Request) -> web.StreamResponse:
        index, _ = _wait_param(request)
        last = -1 if index is None else index
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while True:
                snapshot = await registry.wait_for_change(last, 15.0)
                if snapshot.revision > last:
                    last = snapshot.revision
                    data = json.dumps(registry.describe(), separators=(",", ":"))
                    await response.write(f"id: {last}\nevent: catalog\ndata: {data}\n\n".encode())
                else:
                    await response.write(b": keep-alive\n\n")  # detects clients that left
        except ConnectionResetError:  # the client left
            pass
        return response

    base = "/v1/services/{service}/instances/{id}"
    return [
        web.get("/v1/services", services),
        web.get("/v1/services/{service}", service),
        web.put(base, register),
        web.delete(base, deregister),
        web.put(base + "/heartbeat", heartbeat),
        web.get("/v1/watch", watch),
    ]
