"""An unmodified program resolves ``web.svc.internal`` through the system resolver (glibc).

The DNS server (``python -m discovery.dns``) runs inside a fresh network namespace, on that
namespace's own 127.0.0.1:53; ``/etc/netns/<name>/resolv.conf`` says ``nameserver 127.0.0.1``,
and ``ip netns exec`` bind-mounts it over /etc/resolv.conf for every program run in there. So
``getent hosts`` and Python's ``socket.getaddrinfo`` - programs that know nothing of pointsman
- ask our server. Nothing of the host's own network or resolv.conf is touched.

Skipped, saying why, where namespaces cannot be made (not root, no ``ip``, a container
without CAP_SYS_ADMIN); everything made is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") and os.environ.get("POINTSMAN_REQUIRE_NETNS"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def netns() -> Iterator[str]:
    """A new network namespace with its loopback up, and its /etc/netns directory."""
    ip = shutil.which("ip")
    if ip is None:
        _skip_or_fail("network namespaces: the 'ip' command (iproute2) is missing")
    if os.geteuid() != 0:
        _skip_or_fail("network namespaces: creating one needs root (CAP_SYS_ADMIN)")
    name = f"pmdns{os.getpid()}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)  # type: ignore[list-item]
    if made.returncode != 0:
        _skip_or_fail(f"network namespaces are not permitted here: ip netns add: {made.stderr.strip()}")
    parent = Path("/etc/netns")
    made_parent = not parent.exists()
    etc = parent / name
    try:
        subprocess.run([ip, "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)  # type: ignore[list-item]
        etc.mkdir(parents=True)
        # timeout/attempts keep a failure fast instead of glibc's 5 s x 2 default.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:2\n")
        yield name
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run([ip, "netns", "del", name], capture_output=True)  # type: ignore[list-item]
        if made_parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


async def run_in(netns: str, *argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_unmodified_program_resolves_through_the_system_resolver(netns: str, tmp_path: Path) -> None:
    config = {
        "discovery": {
            # upstreams: [] -- inside the namespace there is nowhere to forward to anyway.
            "dns": {"listen": "127.0.0.1:53", "domain": "internal", "upstreams": []},
            "services": [
                {
                    "name": "web",
                    "instances": [
                        {"id": "web-1", "address": "10.1.2.3"},
                        {"id": "web-2", "address": "10.1.2.4", "health": "critical"},
                    ],
                },
                {"name": "db", "instances": [{"id": "db-1", "address": "fd00::5"}]},
            ],
        }
    }
    path = tmp_path / "pointsman.yaml"
    path.write_text(yaml.safe_dump(config))
    server = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        netns,
        sys.executable,
        "-m",
        "discovery.dns",
        "--config",
        str(path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 20)
        assert line.startswith(b"dns: listening on udp 127.0.0.1:53"), line + await server.stdout.read()

        code, out = await run_in(netns, "getent", "hosts", "web.svc.internal")
        assert code == 0, out
        assert out.split() == ["10.1.2.3", "web.svc.internal"]  # web-2 is critical: not listed

        code, out = await run_in(netns, "getent", "hosts", "db.svc.internal")  # an IPv6-only service
        assert code == 0, out
        assert out.split()[0] == "fd00::5"

        program = "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('web.svc.internal', 80)}))"
        code, out = await run_in(netns, sys.executable, "-c", program)
        assert code == 0, out
        assert out.strip() == "['10.1.2.3']"

        code, out = await run_in(netns, "getent", "hosts", "nope.svc.internal")
        assert code == 2, out  # getent: key not found (NXDOMAIN)
    finally:
        if server.returncode is None:
            server.terminate()
        await asyncio.wait_for(server.wait(), 10)
