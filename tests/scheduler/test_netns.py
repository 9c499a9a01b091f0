"""Process tasks in a network namespace of their own, on the real kernel with the real `ip`.

Each test uses a bridge, subnet and name prefix of its own (`pmt<pid>`, 10.214.0.0/16), never
the real `pm0`, and removes it at the end. The host reaches an instance at its address through
the bridge; an instance reaches the gateway; an unmodified program in there resolves
`db.svc.internal` through glibc, asking pointsman's DNS server on the gateway address, port 53.

Skipped, saying why, where namespaces cannot be made (not root, no `ip`, a container without
CAP_SYS_ADMIN/CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery.config import DnsConfig
from discovery.dns import DnsServer
from discovery.model import Catalog, Instance, Snapshot
from scheduler.driver import DriverError, TaskHandle, TaskSpec
from scheduler.drivers.process import ProcessDriver
from scheduler.netns import NetnsError, NetworkNamespaces

PY = sys.executable
SUBNET = "10.214.0.0/16"
GATEWAY = "10.214.0.1"
BRIDGE = f"pmt{os.getpid()}"
PREFIX = f"t{os.getpid():x}"
ETC_NETNS = Path("/etc/netns")


def spec(alloc_id: str, *command: str, **kw: object) -> TaskSpec:
    fields: dict[str, object] = {"env": {}, "ports": {}, "cpu": 0.0, "memory": 0, "network": "namespace"}
    fields.update(kw)
    return TaskSpec(alloc_id=alloc_id, job="web", command=command, **fields)  # type: ignore[arg-type]


def namespaces(state_dir: Path) -> NetworkNamespaces:
    return NetworkNamespaces(state_dir / "netns", bridge=BRIDGE, subnet=SUBNET, prefix=PREFIX)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    ip = NetworkNamespaces.ip_command()
    assert ip is not None
    return subprocess.run([ip, *args], capture_output=True, text=True, check=False)


def _usable() -> str | None:
    """Why namespaces cannot be tested here, or None: tried for real with a throwaway one."""
    if NetworkNamespaces.ip_command() is None:
        return "network namespaces: the 'ip' command (iproute2) is missing"
    if os.geteuid() != 0:
        return "network namespaces: creating one needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"{PREFIX}-probe"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"network namespaces are not permitted here: ip netns add: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    made = _ip("link", "add", "name", f"{PREFIX}probe", "type", "bridge")
    if made.returncode != 0:
        return f"bridges are not permitted here: ip link add type bridge: {made.stderr.strip()}"
    _ip("link", "del", f"{PREFIX}probe")
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") and os.environ.get("POINTSMAN_REQUIRE_NETNS"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[ProcessDriver]:
    reason = _usable()
    if reason is not None:
        _skip_or_fail(reason)
    made_etc = not ETC_NETNS.exists()
    drv = ProcessDriver(tmp_path / "state", network=namespaces(tmp_path / "state"))
    try:
        yield drv
    finally:
        await drv.cleanup(keep=set())
        for child in list(drv._children.values()):
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
        await drv.network.remove_bridge()
        leftovers = [line for line in _ip("netns", "list").stdout.splitlines() if line.startswith(f"{PREFIX}-")]
        for line in leftovers:  # only after a failed test: reported below, but not left behind
            _ip("netns", "del", line.split()[0])
        if made_etc and ETC_NETNS.is_dir() and not any(ETC_NETNS.iterdir()):
            ETC_NETNS.rmdir()
        assert not leftovers, f"namespaces left behind: {leftovers}"


async def wait_for_log(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s: {content!r}")


async def http_get(host: str, port: int, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.write(b"GET /hello.txt HTTP/1.0\r\nHost: test\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        await writer.wait_closed()
        return response


def namespace_names() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name).returncode == 0


def assert_all_gone(driver: ProcessDriver, handle: TaskHandle, netns: str, veth: str) -> None:
    assert netns not in namespace_names()
    assert not link_exists(veth)
    assert not (ETC_NETNS / netns).exists()
    assert driver.network.lease(handle.alloc_id) is None
    assert not (driver.state_dir / "netns" / "leases" / f"{handle.address}.json").exists()
    for hierarchy in ("", "memory/", "cpu/"):
        assert not Path(f"/sys/fs/cgroup/{hierarchy}pointsman/{handle.alloc_id}").exists()
    assert not (driver.state_dir / "tasks" / f"{handle.alloc_id}.json").exists()


# -- the driver ---------------------------------------------------------------------------------


async def test_http_server_answers_the_host_at_its_own_address(driver: ProcessDriver) -> None:
    s = spec(
        "web-ns",
        PY,
        "-m",
        "http.server",
        "${PORT_HTTP}",
        "--bind",
        "${HOST}",
        ports={"http": 8080},
        memory=256 * 1024**2,
    )
    handle = await driver.start(s)
    assert handle.address == "10.214.0.2"  # the lowest free address: .1 is the gateway
    (driver.state_dir / "work" / "web-ns" / "hello.txt").write_text("hello from a namespace")
    response = await http_get(handle.address, 8080)
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(b"hello from a namespace")
    # It bound its own address, not the host's: nothing answers on the host's loopback.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", 8080)
    lease = driver.network.lease("web-ns")
    assert lease is not None
    assert (ETC_NETNS / lease.netns / "resolv.conf").read_text() == (
        f"nameserver {GATEWAY}\noptions timeout:1 attempts:2\n"
    )
    # Limits still apply: the cgroup join happens before `ip netns exec`.
    if driver.cgroups is not None:
        assert handle.limits.startswith("cgroup v") and "=268435456" in handle.limits
        membership = Path(f"/proc/{handle.ref.split(':')[0]}/cgroup").read_text()
        assert membership.count("pointsman/web-ns\n") >= 1, membership
    result = await driver.stop(handle, grace=2)
    assert result.reason == "stopped (killed by signal 15 (SIGTERM))"
    assert_all_gone(driver, handle, lease.netns, lease.veth)


async def test_instance_reaches_the_gateway(driver: ProcessDriver) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        writer.write(f"hello {peer}\n".encode())
        await writer.drain()
        writer.close()

    await driver.network.ensure_bridge()  # the gateway address exists once the bridge does
    server = await asyncio.start_server(greet, GATEWAY, 0)
    port = server.sockets[0].getsockname()[1]
    program = (
        "import os, socket\n"
        f"with socket.create_connection(('{GATEWAY}', {port}), timeout=5) as s:\n"
        "    print(os.environ['HOST'], s.recv(100).decode().strip())\n"
    )
    try:
        handle = await driver.start(spec("client-ns", PY, "-c", program))
        result = await asyncio.wait_for(driver.wait(handle), 10)
    finally:
        server.close()
        await server.wait_closed()
    out = driver.log_paths("client-ns")
    assert result.code == 0, out[1].read_text()
    # ${HOST} is the instance's address, and that is the source the gateway saw.
    assert out[0].read_text() == f"{handle.address} hello {handle.address}\n"


async def test_unmodified_program_resolves_through_dns_on_the_gateway(driver: ProcessDriver) -> None:
    # Bring the bridge (and so the gateway address) up first: the DNS server binds to it.
    await driver.network.ensure_bridge()
    catalog = Catalog()
    db = Instance(id="db-1", service="db", address="10.9.8.7", ports={}, tags=(), meta={}, weight=1, health="passing")
    catalog.publish(Snapshot(1, {"db": (db,)}))
    config = DnsConfig.model_validate({"listen": f"{GATEWAY}:53", "upstreams": [], "allow": [SUBNET]})
    server = DnsServer(config, catalog)
    await server.start()
    program = "import socket; print(socket.getaddrinfo('db.svc.internal', 5432)[0][4][0])"
    try:
        handle = await driver.start(spec("resolve-ns", PY, "-c", program))
        result = await asyncio.wait_for(driver.wait(handle), 15)
    finally:
        await server.stop()
    stdout, stderr = driver.log_paths("resolve-ns")
    assert result.code == 0, stderr.read_text()
    assert stdout.read_text() == "10.9.8.7\n"


async def test_dns_setting_goes_to_resolv_conf(driver: ProcessDriver) -> None:
    handle = await driver.start(spec("dns-ns", PY, "-c", "print(open('/etc/resolv.conf').read())", dns="10.214.0.53"))
    result = await asyncio.wait_for(driver.wait(handle), 10)
    assert result.code == 0
    # What the program sees as /etc/resolv.conf (ip netns exec's bind mount), not the host's.
    assert driver.log_paths("dns-ns")[0].read_text() == "nameserver 10.214.0.53\noptions timeout:1 attempts:2\n\n"
    with pytest.raises(DriverError, match="not an IPv4 address"):
        await driver.start(spec("bad-dns", PY, "-c", "pass", dns="db.internal"))
    assert driver.network.leases() == []


async def test_two_instances_get_different_addresses(driver: ProcessDriver) -> None:
    sleeper = ("-c", "import os, time; print(os.environ['HOST'], flush=True); time.sleep(30)")
    first = await driver.start(spec("one", PY, *sleeper))
    second = await driver.start(spec("two", PY, *sleeper))
    assert first.address is not None and second.address is not None
    assert first.address != second.address
    assert {first.address, second.address} == {"10.214.0.2", "10.214.0.3"}
    for handle in (first, second):
        assert ipaddress.ip_address(handle.address or "") in ipaddress.ip_network(SUBNET)
        assert (await wait_for_log(driver.log_paths(handle.alloc_id)[0], "\n")) == f"{handle.address}\n"
    leases = {lease.alloc_id: lease for lease in driver.network.leases()}
    assert leases["one"].netns != leases["two"].netns
    assert leases["one"].veth != leases["two"].veth
    # Freed addresses are reused, lowest first; a live one never is.
    await driver.stop(first, grace=1)
    third = await driver.start(spec("three", PY, *sleeper))
    assert third.address == first.address
    assert third.address != second.address


async def test_everything_is_removed_after_stop(driver: ProcessDriver) -> None:
    script = "import time; print('ready', flush=True); time.sleep(30)"
    handle = await driver.start(spec("gone-ns", PY, "-c", script, cpu=0.5, memory=64 * 1024**2))
    await wait_for_log(driver.log_paths("gone-ns")[0], "ready")  # past the wrapper and `ip netns exec`
    lease = driver.network.lease("gone-ns")
    assert lease is not None
    assert lease.netns in namespace_names()
    assert link_exists(lease.veth)
    assert _ip("-n", lease.netns, "addr", "show", "dev", "eth0").stdout.count(f"inet {handle.address}/16") == 1
    assert f"default via {GATEWAY} dev eth0" in _ip("-n", lease.netns, "route").stdout
    # The task runs in that namespace: its network namespace is the one `ip` made.
    pid = int(handle.ref.split(":")[0])
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{lease.netns}").st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    await driver.stop(handle, grace=1)
    assert_all_gone(driver, handle, lease.netns, lease.veth)


async def test_task_that_ends_by_itself_releases_its_namespace(driver: ProcessDriver) -> None:
    handle = await driver.start(spec("short-ns", PY, "-c", "pass"))
    lease = driver.network.lease("short-ns")
    assert lease is not None
    assert (await asyncio.wait_for(driver.wait(handle), 10)).code == 0
    assert_all_gone(driver, handle, lease.netns, lease.veth)


async def test_restarted_driver_adopts_with_the_same_address(driver: ProcessDriver) -> None:
    s = spec("adopt-ns", PY, "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}", ports={"http": 8080})
    handle = await driver.start(s)
    (driver.state_dir / "work" / "adopt-ns" / "hello.txt").write_text("still here")
    assert (await http_get(handle.address or "", 8080)).endswith(b"still here")
    lease = driver.network.lease("adopt-ns")
    assert lease is not None

    restarted = ProcessDriver(driver.state_dir, network=namespaces(driver.state_dir))
    assert await restarted.running() == [handle]
    assert (await restarted.running())[0].address == handle.address == lease.address
    # The restarted pointsman hands out other addresses, never the adopted one.
    other = await restarted.start(spec("new-ns", PY, "-c", "import time; time.sleep(30)"))
    assert other.address not in (None, handle.address)
    assert (await http_get(handle.address or "", 8080)).endswith(b"still here")

    result = await restarted.stop(handle, grace=2)
    assert result.reason.startswith("stopped")
    assert_all_gone(restarted, handle, lease.netns, lease.veth)
    await restarted.stop(other, grace=1)


async def test_host_mode_is_unchanged(driver: ProcessDriver) -> None:
    handle = await driver.start(spec("host-mode", PY, "-c", "import os; print(os.environ['HOST'])", network="host"))
    assert handle.address is None
    assert (await asyncio.wait_for(driver.wait(handle), 5)).code == 0
    assert driver.log_paths("host-mode")[0].read_text() == "127.0.0.1\n"
    assert driver.network.leases() == []
    with pytest.raises(DriverError, match="network 'bridge'"):
        await driver.start(spec("odd", PY, "-c", "pass", network="bridge"))


# -- the host side on its own -------------------------------------------------------------------


async def test_setup_is_idempotent_and_leases_are_exclusive(driver: ProcessDriver) -> None:
    network = driver.network
    await network.ensure_bridge()
    await network.ensure_bridge()  # again: no error, same address
    assert f"inet {GATEWAY}/16" in _ip("addr", "show", "dev", BRIDGE).stdout
    # Concurrent setups (two tasks starting at once) never share an address.
    leases = await asyncio.gather(*(network.setup(f"n{i}") for i in range(4)))
    assert sorted(lease.address for lease in leases) == [f"10.214.0.{i}" for i in range(2, 6)]
    # Setting up an allocation again (after a crash, say) keeps its address and rebuilds it.
    again = await network.setup("n1")
    assert again.address == leases[1].address
    assert again.netns in namespace_names()
    # A second manager on the same state (a restarted pointsman) sees the same leases.
    assert {lease.alloc_id: lease.address for lease in namespaces(driver.state_dir).leases()} == {
        lease.alloc_id: lease.address for lease in leases
    }
    for lease in leases:
        await network.release(lease.alloc_id)
        await network.release(lease.alloc_id)  # idempotent
        assert lease.netns not in namespace_names()
        assert not link_exists(lease.veth)
    assert network.leases() == []


async def test_cleanup_releases_a_lease_without_a_task(driver: ProcessDriver) -> None:
    lease = await driver.network.setup("crashed")  # as if pointsman died before the task started
    assert lease.netns in namespace_names()
    assert await driver.cleanup(keep=set()) == []
    assert driver.network.lease("crashed") is None
    assert lease.netns not in namespace_names()


def test_names_fit_and_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name prefix"):
        NetworkNamespaces(tmp_path, prefix="Too-Long-Prefix")
    with pytest.raises(ValueError, match="no room"):
        NetworkNamespaces(tmp_path, subnet="10.214.0.0/31")
    assert issubclass(NetnsError, DriverError)
    network = NetworkNamespaces(tmp_path, prefix="abcdefgh", subnet="10.0.0.0/8")
    lease = network._acquire("a", "10.0.0.1")
    # The largest index of a /8 still makes interface names within 15 bytes.
    assert len(f"abcdefghv{network.subnet.num_addresses - 2:x}") <= 15
    assert (lease.address, lease.netns, lease.veth) == ("10.0.0.2", "abcdefgh-2", "abcdefghv2")
    assert network._acquire("b", "10.0.0.1").address == "10.0.0.3"
    stored = json.loads((tmp_path / "leases" / "10.0.0.2.json").read_text())
    assert stored["alloc_id"] == "a" and stored["netns"] == "abcdefgh-2"
