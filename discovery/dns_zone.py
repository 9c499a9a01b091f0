"""What a name means: a catalog snapshot seen as the zone ``<domain>`` (sans-IO).

:class:`DnsResolver` maps one question (labels, type, class) to an :class:`AnswerPlan` (rcode,
records per section, whether the answer rotates) or to ``None``: not ours, forward it. It
knows nothing of sockets, caches or wire bytes; ``dns_cache`` encodes plans with dnslib.

The names of the zone (``<domain>`` = ``internal`` by default):

    internal                          SOA, NS (ns.internal)
    ns.internal                       A/AAAA of the listen address, when it is a specific one
    svc.internal                      (empty non-terminal: NODATA for every type)
    web.svc.internal                  A/AAAA of the usable instances (passing, else warning)
    <tag>.web.svc.internal            the same, among the instances with that tag
    <id>.web.svc.internal             A/AAAA of that instance (whatever its health), TXT of its meta
    _tcp.web.svc.internal             (empty non-terminal when any instance has a port)
    _<port>._tcp.web.svc.internal     SRV of the usable instances with that named port, their
                                      A/AAAA in the additional section; ``_udp`` alike (the
                                      registry does not record a port's protocol)

plus PTR for ``<reversed address>.in-addr.arpa`` / ``ip6.arpa`` of instance addresses. A name
exists (NOERROR, possibly NODATA) as long as an instance is registered for it whatever its
health, so a name does not flicker to NXDOMAIN while its instances are failing checks; what the
answer holds follows health. Every negative answer inside the domain carries the domain's SOA
with the negative TTL (RFC 2308), which is what resolvers cache the negative answer for.

Each plan has a ``tag``: the service it depends on, or :data:`STATIC` (depends on the config
only) or :data:`REVERSE` (depends on every service). The cache drops a plan's encoded answers
when its tag's service changes, and only then.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dnslib import AAAA, NS, PTR, RR, SOA, SRV, TXT, A, DNSLabel

from discovery.config import DnsConfig
from discovery.dns_wire import (
    C_ANY,
    C_IN,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    T_A,
    T_AAAA,
    T_ANY,
    T_NS,
    T_PTR,
    T_SOA,
    T_SRV,
    T_TXT,
)
from discovery.model import EMPTY, Instance, Snapshot

STATIC = "\x00static"  # tags that cannot be service names (those are DNS labels)
REVERSE = "\x00reverse"

# Query types that ask for a transfer or other meta data (RFC 1035 3.2.3, RFC 1995, 2845,
# 2930): no zone transfers here, and no reason to forward them.
_META_TYPES = frozenset({249, 250, 251, 252, 253, 254})
_PROTOCOLS = (b"_tcp", b"_udp")
_HEX = frozenset("0123456789abcdef")
_MAX_TXT = 255  # a TXT character-string is at most 255 bytes (RFC 1035 3.3)


@dataclass(slots=True)
class AnswerPlan:
    rcode: int
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    tag: str = STATIC
    authoritative: bool = True
    rotate: bool = False  # the answer section holds interchangeable records served in turns
    # The registered service the question is about (its name as registered), for the
    # `service` label; "" for every other name (never a name a client made up).
    service: str = ""


class _ServiceView:
    """The lookups of one service, built on first use per snapshot."""

    __slots__ = ("by_id", "instances", "name", "ports", "tags")

    def __init__(self, name: str, instances: tuple[Instance, ...]) -> None:
        self.name = name
        self.instances = instances
        self.by_id = {i.id.lower(): i for i in instances}
        self.tags: set[str] = {t.lower() for i in instances for t in i.tags}
        self.ports: set[str] = {p.lower() for i in instances for p in i.ports}


def _usable(instances: Iterable[Instance]) -> list[Instance]:
    """Snapshot.usable's rule applied to a subset: passing, else warning, never critical."""
    candidates = list(instances)
    passing = [i for i in candidates if i.health == "passing"]
    return passing or [i for i in candidates if i.health == "warning"]


def reverse_address(labels: Sequence[bytes]) -> str | None:
    """``4.3.2.1.in-addr.arpa`` -> ``1.2.3.4``; 32 nibbles + ``ip6.arpa`` -> the IPv6 address.
    None for anything else (a partial reverse name, a label that is not a digit)."""
    try:
        if len(labels) == 6 and labels[4] == b"in-addr" and labels[5] == b"arpa":
            octets = [int(label) for label in reversed(labels[:4]) if label.isdigit() and len(label) <= 3]
            if len(octets) == 4 and all(o < 256 for o in octets):
                return ".".join(map(str, octets))
        elif len(labels) == 34 and labels[32] == b"ip6" and labels[33] == b"arpa":
            nibbles = b"".join(reversed(labels[:32])).decode("ascii").lower()
            if len(nibbles) == 32 and all(c in _HEX for c in nibbles):
                return str(ipaddress.IPv6Address(int(nibbles, 16)))
    except (ValueError, UnicodeDecodeError):
        return None
    return None


class DnsResolver:
    """A snapshot as the zone of ``config.domain``; call :meth:`use` with each new snapshot."""

    def __init__(self, config: DnsConfig, *, forwarding: bool, serial: int | None = None) -> None:
        self.config = config
        self.forwarding = forwarding  # False: names outside the zone are REFUSED, not forwarded
        self.domain: tuple[bytes, ...] = tuple(label.encode() for label in config.domain.split("."))
        self.ttl = int(config.ttl)
        self.negative_ttl = config.negative
        # No zone transfers, so the serial means nothing to anyone; keeping it fixed for the
        # life of the server lets cached negative answers survive unrelated catalog changes.
        self.serial = (int(time.time()) if serial is None else serial) & 0xFFFFFFFF
        self._apex = DNSLabel(list(self.domain))
        self._ns = DNSLabel([b"ns", *self.domain])
        self._soa = RR(
            self._apex,
            T_SOA,
            ttl=self.negative_ttl,
            rdata=SOA(
                self._ns, DNSLabel([b"hostmaster", *self.domain]), (self.serial, 3600, 600, 86400, self.negative_ttl)
            ),
        )
        host = config.listen[0]
        self._ns_address = None if ipaddress.ip_address(host).is_unspecified else host
        self.snapshot: Snapshot = EMPTY
        self._services: dict[str, str] = {}  # lowercased name -> name in the snapshot
        self._views: dict[str, _ServiceView] = {}
        self._reverse: dict[str, list[Instance]] | None = None

    def use(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._services = {name.lower(): name for name in snapshot.services}
        self._views = {}
        self._reverse = None

    # -- lookups ------------------------------------------------------------------------------

    def resolve(self, labels: tuple[bytes, ...], qtype: int, qclass: int) -> AnswerPlan | None:
        """The answer to one question (labels lowercased), or None: forward it upstream."""
        n = len(self.domain)
        inside = len(labels) >= n and labels[len(labels) - n :] == self.domain
        if qclass not in (C_IN, C_ANY) or qtype in _META_TYPES:
            # Only the Internet class exists here; CHAOS (version.bind) and transfers are refused.
            return AnswerPlan(REFUSED, authoritative=inside)
        if not inside:
            if labels and labels[-1] == b"arpa" and qtype in (T_PTR, T_ANY):
                plan = self._ptr(labels)
                if plan is not None:
                    return plan
            return None if self.forwarding else AnswerPlan(REFUSED, authoritative=False)
        owner = DNSLabel(list(labels))
        rel = labels[: len(labels) - n]
        if not rel:
            return self._apex_answer(qtype)
        if rel == (b"ns",):
            return self._nodata() if self._ns_address is None else self._addresses([self._ns_address], qtype, STATIC)
        if rel[-1] != b"svc":
            return self._nxdomain(STATIC)
        if len(rel) == 1:
            return self._nodata()  # svc.<domain>: an empty non-terminal
        service = rel[-2].decode("ascii", "replace")
        view = self._view(service)
        if view is None:
            return self._nxdomain(service)
        plan = self._in_service(owner, rel, view, qtype)
        plan.service = view.name
        return plan

    def _in_service(self, owner: DNSLabel, rel: tuple[bytes, ...], view: _ServiceView, qtype: int) -> AnswerPlan:
        """The names under <service>.svc.<domain>: the service, an instance or tag, SRV."""
        tag = view.name.lower()
        if len(rel) == 2:
            return self._instances(owner, view.instances, qtype, tag)
        if len(rel) == 3:
            label = rel[0].decode("ascii", "replace")
            if rel[0] in _PROTOCOLS:
                return self._nodata(tag) if view.ports else self._nxdomain(tag)
            instance = view.by_id.get(label)
            if instance is not None:
                return self._instance(owner, instance, qtype, tag)
            if label in view.tags:
                tagged = [i for i in view.instances if label in (t.lower() for t in i.tags)]
                return self._instances(owner, tagged, qtype, tag)
            return self._nxdomain(tag)
        if len(rel) == 4 and rel[1] in _PROTOCOLS and rel[0][:1] == b"_":
            port = rel[0][1:].decode("ascii", "replace")
            if port in view.ports:
                return self._srv(owner, view, port, qtype, tag)
        return self._nxdomain(tag)

    def _view(self, lowered: str) -> _ServiceView | None:
        view = self._views.get(lowered)
        if view is None:
            name = self._services.get(lowered)
            if name is None:
                return None
            view = self._views[lowered] = _ServiceView(name, self.snapshot.services[name])
        return view

    # -- plans --------------------------------------------------------------------------------

    def _nxdomain(self, tag: str) -> AnswerPlan:
        return AnswerPlan(NXDOMAIN, authority=[self._soa], tag=tag)

    def _nodata(self, tag: str = STATIC) -> AnswerPlan:
        return AnswerPlan(NOERROR, authority=[self._soa], tag=tag)

    def _apex_answer(self, qtype: int) -> AnswerPlan:
        answer: list[RR] = []
        additional: list[RR] = []
        if qtype in (T_SOA, T_ANY):
            answer.append(self._soa)
        if qtype in (T_NS, T_ANY):
            answer.append(RR(self._apex, T_NS, ttl=self.ttl, rdata=NS(self._ns)))
            if self._ns_address is not None:
                additional += self._address_records(self._ns, [self._ns_address], T_ANY)
        if not answer:
            return self._nodata()
        return AnswerPlan(NOERROR, answer=answer, additional=additional)

    def _address_records(self, name: DNSLabel, addresses: Iterable[str], qtype: int) -> list[RR]:
        out = []
        for address in addresses:
            v6 = ":" in address
            if v6 and qtype in (T_AAAA, T_ANY):
                out.append(RR(name, T_AAAA, ttl=self.ttl, rdata=AAAA(address)))
            elif not v6 and qtype in (T_A, T_ANY):
                out.append(RR(name, T_A, ttl=self.ttl, rdata=A(address)))
        return out

    def _addresses(self, addresses: list[str], qtype: int, tag: str) -> AnswerPlan:
        if qtype not in (T_A, T_AAAA, T_ANY):
            return self._nodata(tag)
        records = self._address_records(self._ns, addresses, qtype)
        return AnswerPlan(NOERROR, answer=records, tag=tag) if records else self._nodata(tag)

    def _instances(self, owner: DNSLabel, instances: Sequence[Instance], qtype: int, tag: str) -> AnswerPlan:
        """A/AAAA of a service or tag name: the usable instances, rotated per answer."""
        if qtype not in (T_A, T_AAAA, T_ANY):
            return self._nodata(tag)
        records = self._address_records(owner, (i.address for i in _usable(instances)), qtype)
        if not records:
            return self._nodata(tag)
        return AnswerPlan(NOERROR, answer=records, tag=tag, rotate=len(records) > 1)

    def _instance(self, owner: DNSLabel, instance: Instance, qtype: int, tag: str) -> AnswerPlan:
        records = self._address_records(owner, [instance.address], qtype)
        if qtype in (T_TXT, T_ANY) and instance.meta:
            records.append(RR(owner, T_TXT, ttl=self.ttl, rdata=TXT(_txt_strings(instance.meta))))
        return AnswerPlan(NOERROR, answer=records, tag=tag) if records else self._nodata(tag)

    def instance_name(self, instance: Instance) -> DNSLabel:
        return DNSLabel([instance.id.lower().encode(), instance.service.lower().encode(), b"svc", *self.domain])

    def _srv(self, owner: DNSLabel, view: _ServiceView, port: str, qtype: int, tag: str) -> AnswerPlan:
        if qtype not in (T_SRV, T_ANY):
            return self._nodata(tag)
        having = [i for i in view.instances if port in (p.lower() for p in i.ports)]
        answer: list[RR] = []
        additional: list[RR] = []
        for instance in _usable(having):
            number = next(v for k, v in instance.ports.items() if k.lower() == port)
            target = self.instance_name(instance)
            srv = SRV(priority=0, weight=max(0, min(instance.weight, 0xFFFF)), port=number, target=target)
            answer.append(RR(owner, T_SRV, ttl=self.ttl, rdata=srv))
            additional += self._address_records(target, [instance.address], T_ANY)
        if not answer:
            return self._nodata(tag)
        return AnswerPlan(NOERROR, answer=answer, additional=additional, tag=tag, rotate=len(answer) > 1)

    def _ptr(self, labels: tuple[bytes, ...]) -> AnswerPlan | None:
        """PTR for an instance address; None (forward) for any other address."""
        address = reverse_address(labels)
        if address is None:
            return None
        if self._reverse is None:
            index: dict[str, list[Instance]] = {}
            for instances in self.snapshot.services.values():
                for instance in instances:
                    index.setdefault(str(ipaddress.ip_address(instance.address)), []).append(instance)
            self._reverse = index
        found = self._reverse.get(address)
        if not found:
            return None
        owner = DNSLabel(list(labels))
        answer = [RR(owner, T_PTR, ttl=self.ttl, rdata=PTR(self.instance_name(i))) for i in found]
        # Authoritative for these records only, not for the reverse zone they sit in.
        return AnswerPlan(NOERROR, answer=answer, tag=REVERSE, authoritative=False)


def _txt_strings(meta: Mapping[str, str]) -> list[bytes]:
    """``key=value`` strings (RFC 1464), sorted by key; one longer than a TXT string's 255 bytes
    is cut there (at a UTF-8 character boundary) rather than silently dropped."""
    out = []
    for key, value in sorted(meta.items()):
        text = f"{key}={value}".encode()
        if len(text) > _MAX_TXT:
            text = text[:_MAX_TXT].decode("utf-8", "ignore").encode()
        out.append(text)
    return out
