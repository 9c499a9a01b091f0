"""What runs where, for a person: printed by `pointsman up` once it is ready.

Built from the running components (bound addresses, not the config's port 0), so every line is
something to copy and try: the URL to open, the `dig` and `psql` commands, the metrics URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.config import format_address

if TYPE_CHECKING:
    from pointsman.supervisor import Supervisor


def _reachable(host: str, port: int) -> tuple[str, int]:
    return ({"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port)


def banner(supervisor: Supervisor) -> str:
    lines = ["", "pointsman is up:"]
    admin = supervisor.admin.address
    if admin is not None:
        base = f"http://{format_address(_reachable(*admin[:2]))}"
        lines.append(f"  metrics      {base}/metrics")
        lines.append(f"  status       .venv/bin/pointsman status --admin {format_address(_reachable(*admin[:2]))}")
    router = supervisor.component("router")
    listeners = getattr(getattr(router, "router", None), "listeners", {})
    for name, handle in listeners.items():
        if name.startswith("sidecar."):
            continue
        host, port = _reachable(*handle.address[:2])
        protocol = handle.config.protocol
        if protocol == "http":
            lines.append(f"  {name:<12} http://{format_address((host, port))}/")
        elif protocol == "postgres":
            lines.append(f"  {name:<12} psql -h {host} -p {port}   (SQL listener)")
        elif protocol == "mysql":
            lines.append(f"  {name:<12} mariadb -h {host} -P {port}   (SQL listener)")
        else:
            lines.append(f"  {name:<12} tcp {format_address((host, port))}")
    discovery = supervisor.component("discovery")
    dns = getattr(discovery, "dns", None)
    if dns is not None:
        host, port = dns.address[:2]
        lines.append(f"  dns          dig @{host} -p {port} +short web.svc.internal")
    scheduler = supervisor.component("scheduler")
    reconciler = getattr(scheduler, "reconciler", None)
    if reconciler is not None:
        jobs = ", ".join(f"{name} x{entry.config.count}" for name, entry in reconciler.jobs.items()) or "none yet"
        lines.append(f"  jobs         {jobs}  (GET /jobs, /allocations)")
    lines.append("  Ctrl-C stops everything.")
    return "\n".join(lines) + "\n"
