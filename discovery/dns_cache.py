"""Encoded answers, ready to send: the catalog turned into bytes once, served many times.

Decoding a query and building its answer with dnslib costs ~150 us; a cached answer costs a
dictionary lookup and one concatenation (the client's 2-byte ID in front of the cached bytes).
So every answer inside the zone is encoded once, lazily on the first query for it, and kept
until the catalog changes the service it came from.

Key: the lowercased wire-format qname + QTYPE + QCLASS (4 bytes as sent) + one "mode" byte
(RD, CD, EDNS, DO: the request bits that change the answer's bytes, see ``dns_wire``). The
EDNS payload size is deliberately not in the key: an entry holds the whole answer, and the
rare answer longer than the client's limit is cut at serve time (:meth:`CachedAnswer.fit`).

Value: a :class:`CachedAnswer` holding the answer minus its first two bytes (the ID), in up
to :data:`MAX_ROTATIONS` orders of the answer section, each encoded on first use. Serving
cycles through them, which is the round-robin (dnsmasq and BIND rotate the same way).

Invalidation: each entry carries its plan's tag (a service name, ``STATIC`` or ``REVERSE``).
:meth:`DnsAnswerCache.update` compares the new snapshot's services with the old one's and
drops the entries of the services that changed (and the reverse entries when anything did),
synchronously in the ``Catalog`` callback: the next query after ``publish`` sees the change.
Bounded: past ``max_entries`` the oldest entry is dropped (first in, first out: no bookkeeping
on a hit, and a flood of random names only recycles the cache, it never grows it).
"""

from __future__ import annotations

from dnslib import EDNS0, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from discovery.dns_wire import (
    MAX_UDP_PAYLOAD,
    MODE_CD,
    MODE_DO,
    MODE_EDNS,
    MODE_RD,
    QTYPE_LABELS,
    RCODE_NAMES,
    name_labels,
)
from discovery.dns_zone import REVERSE, AnswerPlan, DnsResolver
from discovery.model import Snapshot

MAX_ROTATIONS = 32  # distinct first records before the order repeats; more instances share turns
DEFAULT_MAX_ENTRIES = 50_000


class CachedAnswer:
    """One question's answer in every rotation, for one mode. ``variants[i]`` is None until the
    i-th order is first served. Everything here is without the 2-byte ID."""

    __slots__ = (
        "_labels",
        "_plan",
        "_qclass",
        "_qtype",
        "_ra",
        "_reduced",
        "_truncated",
        "metric",
        "mode",
        "tag",
        "turn",
        "variants",
    )

    def __init__(
        self, plan: AnswerPlan, labels: tuple[bytes, ...], qtype: int, qclass: int, mode: int, ra: bool
    ) -> None:
        self._plan = plan
        self._labels = labels
        self._qtype = qtype
        self._qclass = qclass
        self._ra = ra
        self.mode = mode
        self.tag = plan.tag
        rotations = min(len(plan.answer), MAX_ROTATIONS) if plan.rotate else 1
        self.variants: list[bytes | None] = [None] * rotations
        self._reduced: list[bytes | None] = [None] * rotations  # without the additional section
        self._truncated: bytes | None = None
        self.turn = 0
        qlabel = QTYPE_LABELS.get(qtype, "other")
        rcode = RCODE_NAMES.get(plan.rcode, str(plan.rcode))
        # Label tuples of pointsman_dns_queries_total, per transport (0 UDP, 1 TCP), built
        # once so that counting a query is one dictionary increment.
        self.metric = ((plan.service, qlabel, rcode, "udp"), (plan.service, qlabel, rcode, "tcp"))
        self.variants[0] = self._encode(0, additional=True)

    def variant(self, i: int) -> bytes:
        tail = self.variants[i]
        if tail is None:
            tail = self.variants[i] = self._encode(i, additional=True)
        return tail

    def fit(self, i: int, limit: int) -> bytes:
        """Variant ``i`` cut to fit ``limit`` bytes (with the ID): first without the additional
        section (RFC 2181 9: dropping additional data needs no TC bit), else the header and
        question alone with TC set, which sends the client to TCP."""
        if self._plan.additional:
            reduced = self._reduced[i]
            if reduced is None:
                reduced = self._reduced[i] = self._encode(i, additional=False)
            if len(reduced) + 2 <= limit:
                return reduced
        if self._truncated is None:
            self._truncated = self._encode(0, additional=False, truncated=True)
        return self._truncated

    def _encode(self, turn: int, *, additional: bool, truncated: bool = False) -> bytes:
        plan = self._plan
        header = DNSHeader(id=0, qr=1, aa=int(plan.authoritative), tc=int(truncated), rcode=plan.rcode & 0x0F)
        header.rd = 1 if self.mode & MODE_RD else 0
        header.ra = 1 if self._ra else 0
        header.cd = 1 if self.mode & MODE_CD else 0
        record = DNSRecord(header, q=DNSQuestion(DNSLabel(list(self._labels)), self._qtype, self._qclass))
        if not truncated:
            answer = plan.answer
            if turn and answer:
                offset = round(turn * len(answer) / len(self.variants)) % len(answer)
                answer = answer[offset:] + answer[:offset]
            record.rr = list(answer)
            record.auth = list(plan.authority)
            if additional:
                record.ar = list(plan.additional)
        if self.mode & MODE_EDNS:
            record.ar.append(EDNS0(udp_len=MAX_UDP_PAYLOAD, flags="do" if self.mode & MODE_DO else ""))
        return bytes(record.pack())[2:]


class DnsAnswerCache:
    """Encoded answers by key (see the module doc); ``entries`` is read directly on the hot path."""

    def __init__(self, resolver: DnsResolver, *, ra: bool, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.resolver = resolver
        self.ra = ra  # recursion available: we forward for allowed clients
        self.max_entries = max_entries
        self.entries: dict[bytes, CachedAnswer] = {}
        self._by_tag: dict[str, set[bytes]] = {}
        self.builds = 0  # cache misses that built an entry (a counter for metrics)

    def build(self, key: bytes, wire_name: bytes, qtype: int, qclass: int, mode: int) -> CachedAnswer | None:
        """The entry for ``key``, built from the resolver's plan; None when the name is not
        ours (forward it). ``wire_name`` is the lowercased qname in wire format."""
        labels = name_labels(wire_name)
        plan = self.resolver.resolve(labels, qtype, qclass)
        if plan is None:
            return None
        entry = CachedAnswer(plan, labels, qtype, qclass, mode, self.ra)
        self.builds += 1
        if len(self.entries) >= self.max_entries:
            self._evict_oldest()
        self.entries[key] = entry
        self._by_tag.setdefault(entry.tag, set()).add(key)
        return entry

    def _evict_oldest(self) -> None:
        key = next(iter(self.entries))
        entry = self.entries.pop(key)
        keys = self._by_tag.get(entry.tag)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_tag[entry.tag]

    def update(self, snapshot: Snapshot) -> set[str]:
        """Use ``snapshot`` from now on; drop the answers of the services it changed. Returns
        the tags dropped (for tests and logs)."""
        old = self.resolver.snapshot.services
        new = snapshot.services
        # Tuples of frozen dataclasses compare by value, and identical objects short-cut: a
        # registry that reuses the unchanged services' tuples makes this a pointer comparison.
        changed = {name.lower() for name in old.keys() | new.keys() if old.get(name) != new.get(name)}
        self.resolver.use(snapshot)
        if changed:
            changed.add(REVERSE)
        for tag in changed:
            for key in self._by_tag.pop(tag, ()):
                self.entries.pop(key, None)
        return changed

    def clear(self) -> None:
        self.entries.clear()
        self._by_tag.clear()
