"""A network namespace per instance: the host side the process driver builds and tears down.

With `TaskSpec.network == "namespace"` a process task gets its own network stack, so `--bind
${HOST}` binds an address of its own and any port number is free in there. The shape:

    root namespace                                  namespace pm-<index>
    bridge pm0  10.213.0.1/16 (the gateway)  <->    eth0  10.213.x.y/16, lo up,
      └─ pmv<index> (veth, host end)                default route via 10.213.0.1
                                                    /etc/netns/pm-<index>/resolv.conf

The host reaches every instance through the bridge's connected route, and every instance reaches
the gateway address (where pointsman's DNS server can listen). Nothing else: no IP forwarding,
no NAT, no iptables, and the host's own /etc/resolv.conf is never touched. `ip netns exec`
bind-mounts `/etc/netns/<ns>/resolv.conf` over /etc/resolv.conf for the program it runs, so an
unmodified program's getaddrinfo() asks `TaskSpec.dns` (default: the gateway) on port 53.

Leases. The address is the instance's identity on the bridge: the lowest free host address of
the subnet (the first one is the gateway). A lease is a file `<state_dir>/leases/<address>.json`
made complete under a temporary name and then hard-linked into place: link() fails when the
name exists, so two instances can never hold the same address (not even two drivers on one
state dir racing), and a crash never leaves half a lease. The lease records the names, so a
restarted pointsman adopts the instance with the same address and can tear it down later.

Names must be short (interface names: 15 bytes). They derive from the address's index in the
subnet, unique while the lease is held: namespace `pm-2a`, host veth `pmv2a` (the namespace
end is made as `pmc2a` and renamed eth0 inside). The prefix is a constructor argument so tests
use a bridge, subnet and names of their own, never colliding with a real `pm0`.

Everything is idempotent: the bridge is made only when missing (`addr replace`), setting up an
allocation that already holds a lease reuses its address and rebuilds its links (left-overs of
a crash are removed first), and tearing down ignores what is already gone. The `ip` command
(iproute2) does the work, run as asyncio subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.driver import DriverError

BRIDGE = "pm0"
SUBNET = "10.213.0.0/16"  # the gateway is its first host address: 10.213.0.1
PREFIX = "pm"
ETC_NETNS = Path("/etc/netns")
# glibc's default is 5 s x 2 tries per nameserver: a dead resolver should fail fast instead.
RESOLV_OPTIONS = "options timeout:1 attempts:2"

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_IFNAME_MAX = 15


class NetnsError(DriverError):
    """A namespace, veth or bridge could not be made or removed; the message has `ip`'s words."""


@dataclass(frozen=True)
class Lease:
    """One instance's place on the bridge, as written to its lease file."""

    alloc_id: str
    address: str
    prefixlen: int
    gateway: str
    index: int
    netns: str
    veth: str
    dns: str


class NetworkNamespaces:
    """The bridge and the per-allocation namespaces of one pointsman (one state dir)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        bridge: str = BRIDGE,
        subnet: str = SUBNET,
        prefix: str = PREFIX,
        etc_netns: Path = ETC_NETNS,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.leases_dir = self.state_dir / "leases"
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.num_addresses < 4:
            raise ValueError(f"subnet {subnet} has no room for a gateway and instances")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"name prefix {prefix!r}: 1-8 lowercase letters/digits, starting with a letter")
        if not 0 < len(bridge) <= _IFNAME_MAX:
            raise ValueError(f"bridge name {bridge!r}: 1-{_IFNAME_MAX} characters")
        self.bridge = bridge
        self.prefix = prefix
        self.gateway = self.subnet.network_address + 1
        self.etc_netns = etc_netns
        self._bridge_lock = asyncio.Lock()

    # -- availability ------------------------------------------------------------------------

    @staticmethod
    def ip_command() -> str | None:
        """The `ip` binary: PATH first, then the sbin directories a non-root PATH lacks."""
        return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")

    def available(self) -> tuple[bool, str]:
        if self.ip_command() is None:
            return False, "network namespaces: the 'ip' command (iproute2) is missing"
        if os.geteuid() != 0:
            return False, "network namespaces: need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        return True, f"network namespaces on bridge {self.bridge} {self.gateway}/{self.subnet.prefixlen}"

    def exec_prefix(self, lease: Lease) -> tuple[str, ...]:
        """What runs a program inside the lease's namespace, with its resolv.conf mounted.
        `ip netns exec` execs the program (no fork), so the pid is the program's."""
        return (self._ip(), "netns", "exec", lease.netns)

    # -- leases ------------------------------------------------------------------------------

    def lease(self, alloc_id: str) -> Lease | None:
        for lease in self.leases():
            if lease.alloc_id == alloc_id:
                return lease
        return None

    def leases(self) -> list[Lease]:
        found = []
        for path in sorted(self.leases_dir.glob("*.json")) if self.leases_dir.is_dir() else []:
            try:
                found.append(Lease(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # not a lease of ours (a temporary file is never named *.json)
        return found

    def _lease_path(self, address: str) -> Path:
        return self.leases_dir / f"{address}.json"

    def _acquire(self, alloc_id: str, dns: str) -> Lease:
        """The lowest free address, taken with link(): it fails if another holder got there first."""
        self.leases_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.leases_dir / f".{alloc_id}.{os.getpid()}.tmp"
        try:
            for index in range(2, self.subnet.num_addresses - 1):  # 0 network, 1 gateway, last broadcast
                address = str(self.subnet.network_address + index)
                if self._lease_path(address).exists():
                    continue
                lease = Lease(
                    alloc_id=alloc_id,
                    address=address,
                    prefixlen=self.subnet.prefixlen,
                    gateway=str(self.gateway),
                    index=index,
                    netns=f"{self.prefix}-{index:x}",
                    veth=f"{self.prefix}v{index:x}",
                    dns=dns,
                )
                tmp.write_text(json.dumps(asdict(lease), indent=2))
                try:
                    os.link(tmp, self._lease_path(address))
                except FileExistsError:
                    continue
                return lease
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise NetnsError(f"{alloc_id}: no free address left in {self.subnet}")

    # -- host side ---------------------------------------------------------------------------

    def _ip(self) -> str:
        ip = self.ip_command()
        if ip is None:
            raise NetnsError("the 'ip' command (iproute2) is missing")
        return ip

    async def _run(self, *args: str, check: bool = True) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            self._ip(),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        message = err.decode(errors="replace").strip()
        assert process.returncode is not None
        if check and process.returncode != 0:
            raise NetnsError(f"ip {' '.join(args)}: {message or f'exit {process.returncode}'}")
        return process.returncode, message

    async def ensure_bridge(self) -> None:
        """The bridge with the gateway address, up; a no-op when it already is."""
        async with self._bridge_lock:
            code, _ = await self._run("link", "show", "dev", self.bridge, check=False)
            if code != 0:
                code, message = await self._run("link", "add", "name", self.bridge, "type", "bridge", check=False)
                if code != 0 and "exists" not in message:
                    raise NetnsError(f"cannot create bridge {self.bridge}: {message}")
            await self._run("addr", "replace", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            await self._run("link", "set", "dev", self.bridge, "up")

    async def remove_bridge(self) -> None:
        """Delete the bridge (tests; an operator's teardown). Instances' veths go with it."""
        await self._run("link", "del", "dev", self.bridge, check=False)

    async def setup(self, alloc_id: str, dns: str | None = None) -> Lease:
        """The allocation's namespace, veth, address, route and resolv.conf; returns its lease."""
        if dns is not None:
            try:
                nameserver = str(ipaddress.IPv4Address(dns))
            except ValueError:
                raise NetnsError(f"{alloc_id}: dns {dns!r} is not an IPv4 address") from None
        else:
            nameserver = str(self.gateway)
        await self.ensure_bridge()
        lease = self.lease(alloc_id)
        if lease is not None and lease.dns != nameserver:
            lease = Lease(**{**asdict(lease), "dns": nameserver})
            self._write_lease(lease)
        if lease is None:
            lease = self._acquire(alloc_id, nameserver)
        try:
            await self._remove_links(lease)  # what a crash (or an earlier try) left behind
            await self._build(lease)
        except BaseException:
            await self.release(alloc_id)
            raise
        return lease

    def _write_lease(self, lease: Lease) -> None:
        tmp = self.leases_dir / f".{lease.alloc_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(lease), indent=2))
        os.replace(tmp, self._lease_path(lease.address))

    async def _build(self, lease: Lease) -> None:
        ns, peer = lease.netns, f"{self.prefix}c{lease.index:x}"
        await self._run("netns", "add", ns)
        # The namespace end is born inside the namespace: it never appears in the root one.
        await self._run("link", "add", "name", lease.veth, "type", "veth", "peer", "name", peer, "netns", ns)
        await self._run("-n", ns, "link", "set", "dev", peer, "name", "eth0")
        await self._run("-n", ns, "addr", "add", f"{lease.address}/{lease.prefixlen}", "dev", "eth0")
        await self._run("-n", ns, "link", "set", "dev", "lo", "up")
        await self._run("-n", ns, "link", "set", "dev", "eth0", "up")
        await self._run("-n", ns, "route", "replace", "default", "via", lease.gateway, "dev", "eth0")
        await self._run("link", "set", "dev", lease.veth, "master", self.bridge)
        await self._run("link", "set", "dev", lease.veth, "up")
        etc = self.etc_netns / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {lease.dns}\n{RESOLV_OPTIONS}\n")

    async def _remove_links(self, lease: Lease) -> None:
        # Deleting the host end deletes the pair at once; left to the namespace's destruction
        # it would linger until the kernel's asynchronous cleanup got to it.
        await self._run("link", "del", "dev", lease.veth, check=False)
        await self._run("netns", "del", lease.netns, check=False)
        shutil.rmtree(self.etc_netns / lease.netns, ignore_errors=True)

    async def release(self, alloc_id: str) -> None:
        """Remove the allocation's namespace, veth and resolv.conf, then give the address back.
        Call it once the task's processes are gone. A no-op for an allocation without a lease."""
        lease = self.lease(alloc_id)
        if lease is None:
            return
        await self._remove_links(lease)
        with contextlib.suppress(FileNotFoundError):
            self._lease_path(lease.address).unlink()
