"""One DNS message in, the bytes to send back out (sans-IO; the sockets are in ``dns.py``).

The hot path, for a query of the usual shape (see ``dns_wire.scan_query``) from an allowed
client for a name whose answer is cached, is: check the header bytes, walk the qname labels,
one dictionary lookup, pick the next rotation, prepend the client's ID. No dnslib, no objects
beyond the key and the reply. Everything else goes down :meth:`DnsResponder._slow`, which
runs dnslib's full parser and decides between FORMERR, BADVERS and the same cached answer.

Results: ``bytes`` to send, a :class:`Forward` for the server to take upstream, or None to
drop (a message too short to hold a header: there is no ID to answer to; a response: QR set,
answering it could start a loop between two servers).
"""

from __future__ import annotations

from dataclasses import dataclass

from dnslib import DNSRecord

from discovery.dns_cache import CachedAnswer, DnsAnswerCache
from discovery.dns_metrics import DnsStats
from discovery.dns_wire import (
    BADVERS,
    CD,
    FORMERR,
    MAX_UDP_PAYLOAD,
    MODE_BYTES,
    MODE_CD,
    MODE_DO,
    MODE_EDNS,
    NO_EDNS_PAYLOAD,
    NOTIMP,
    QR,
    QTYPE_LABELS,
    RCODE_NAMES,
    RD,
    REFUSED,
    T_OPT,
    error_reply,
    header_only,
    name_wire,
    scan_query,
)

UDP = 0
TCP = 1
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QDCOUNT=1, no other records
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"  # QDCOUNT=1, ARCOUNT=1 (the OPT)
_OPT_HEAD = b"\x00\x00\x29"  # root owner name, TYPE 41
TRANSPORTS = ("udp", "tcp")
TCP_LIMIT = 65535  # a TCP message's 2-byte length prefix


@dataclass(frozen=True, slots=True)
class Forward:
    """A query to send upstream on the client's behalf."""

    query: bytes  # as the client sent it (the forwarder swaps in its own ID)
    question: bytes  # the question section, to build a SERVFAIL when the upstreams fail
    mode: int
    limit: int  # the most the answer may be over UDP; TCP_LIMIT over TCP
    qtype: str  # metric label
    transport: int


class DnsResponder:
    def __init__(self, cache: DnsAnswerCache, stats: DnsStats) -> None:
        self.cache = cache
        self.stats = stats
        self._queries = stats.queries.values

    def respond(self, data: bytes, allowed: bool, transport: int) -> bytes | Forward | None:
        """The answer to one message: bytes, a Forward, or None (drop)."""
        # Fast path: guess where the question ends from the message's length, assuming the
        # usual shape (no OPT, or an OPT without options as the last 11 bytes), and look the
        # guess up. No label walk: the cache only holds keys built from names that were
        # parsed and validated, so a hit proves the guess (a lowercased byte string equal to a
        # valid wire name followed by 4 bytes is one; bytes.lower() never touches a length
        # byte, all of which are < 0x40). A miss, or any other shape, takes the checked path.
        size = len(data)
        if size > 16 and not data[2] & 0xF8 and allowed:  # QR clear, opcode QUERY
            counts = data[4:12]
            if counts == _COUNTS_PLAIN:
                nend = size - 4
                mode = (data[2] & RD) | (MODE_CD if data[3] & CD else 0)
                limit = NO_EDNS_PAYLOAD
            elif counts == _COUNTS_EDNS and data[-11:-8] == _OPT_HEAD and data[-2:] == b"\x00\x00" and not data[-5]:
                # The OPT record as the last 11 bytes, offsets from the end: -11 root name,
                # -10 TYPE (2), -8 CLASS = payload size (2), -6 extended RCODE, -5 VERSION,
                # -4 DO bit + Z (2), -2 RDLEN (2) = 0. Only version 0 here (else BADVERS).
                nend = size - 15
                mode = (data[2] & RD) | (MODE_CD if data[3] & CD else 0)
                mode |= (MODE_EDNS | MODE_DO) if data[-4] & 0x80 else MODE_EDNS
                limit = min(max((data[-8] << 8) | data[-7], NO_EDNS_PAYLOAD), MAX_UDP_PAYLOAD)
            else:
                return self._checked(data, allowed, transport)
            raw = data[12:nend]
            low = raw.lower()
            entry = self.cache.entries.get(low + data[nend : nend + 4] + MODE_BYTES[mode])
            if entry is not None:
                return self._serve(entry, data, raw, low, nend, limit, transport)
        return self._checked(data, allowed, transport)

    def _serve(
        self, entry: CachedAnswer, data: bytes, raw: bytes, low: bytes, nend: int, limit: int, transport: int
    ) -> bytes:
        variants = entry.variants
        if len(variants) == 1:
            i = 0
            tail = variants[0]
        else:
            i = entry.turn
            entry.turn = i + 1 if i + 1 < len(variants) else 0
            tail = variants[i]
        if tail is None:
            tail = entry.variant(i)
        if transport:
            limit = TCP_LIMIT
        if len(tail) + 2 > limit:
            tail = entry.fit(i, limit)
        self._queries[entry.metric[transport]] += 1
        if raw != low:
            # The client asked in mixed case (DNS 0x20 randomisation): answer with its own
            # spelling, as resolvers that randomise check it. The names in the answer are
            # compression pointers to the question, so splicing the question is enough.
            return data[:2] + tail[:10] + raw + tail[nend - 2 :]
        return data[:2] + tail

    def _checked(self, data: bytes, allowed: bool, transport: int) -> bytes | Forward | None:
        """Every message the fast path did not answer: validated, then answered, built into the
        cache, forwarded, refused, or told what is wrong with it."""
        if len(data) < 12:
            self.stats.dropped.values[("short",)] += 1
            return None
        flags = data[2]
        if flags & QR:
            self.stats.dropped.values[("response",)] += 1
            return None
        if flags & 0x78:  # opcode (bits 3-6) other than QUERY: NOTIFY, UPDATE, STATUS, IQUERY
            return self._error(data, None, NOTIMP, 0, "none", transport)
        scanned = scan_query(data)
        if scanned is None:
            return self._slow(data, allowed, transport)
        nend, mode, limit = scanned
        if not allowed:
            return self._error(data, data[12 : nend + 4], REFUSED, mode, _qtype_label(data, nend), transport)
        raw = data[12:nend]
        low = raw.lower()
        tc = data[nend : nend + 4]
        key = low + tc + MODE_BYTES[mode]
        entry = self.cache.entries.get(key)
        if entry is None:
            entry = self.cache.build(key, low, (tc[0] << 8) | tc[1], (tc[2] << 8) | tc[3], mode)
            if entry is None:
                return self._forward(data, data[12 : nend + 4], mode, limit, transport)
        return self._serve(entry, data, raw, low, nend, limit, transport)

    # -- everything unusual -------------------------------------------------------------------

    def _slow(self, data: bytes, allowed: bool, transport: int) -> bytes | Forward | None:
        """Queries the scanner does not take: let dnslib parse them. Whatever it cannot parse is
        malformed: FORMERR, with the header alone (the question may be what is broken)."""
        try:
            record = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, but also struct/Index/Unicode errors on junk
            return self._error(data, None, FORMERR, 0, "none", transport)
        if len(record.questions) != 1:  # RFC 9619: a QUERY has exactly one question
            return self._error(data, None, FORMERR, 0, "none", transport)
        question = record.questions[0]
        labels = tuple(bytes(label).lower() for label in question.qname.label)
        wire = name_wire(labels)
        if len(wire) > 255 or any(len(label) > 63 or not label for label in labels):
            return self._error(data, None, FORMERR, 0, "none", transport)
        qtype, qclass = int(question.qtype), int(question.qclass)
        qsection = wire + qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big")
        qlabel = QTYPE_LABELS.get(qtype, "other")
        mode = (data[2] & RD) | (MODE_CD if data[3] & 0x10 else 0)
        limit = NO_EDNS_PAYLOAD
        opts = [rr for rr in record.ar if rr.rtype == T_OPT]
        if len(opts) > 1:  # RFC 6891 6.1.1: more than one OPT is FORMERR
            return self._error(data, None, FORMERR, 0, qlabel, transport)
        if opts:
            opt = opts[0]
            mode |= (MODE_EDNS | MODE_DO) if opt.ttl & 0x8000 else MODE_EDNS
            limit = min(max(int(opt.rclass), NO_EDNS_PAYLOAD), MAX_UDP_PAYLOAD)
            if (opt.ttl >> 16) & 0xFF != 0:  # EDNS version other than 0 (RFC 6891 6.1.3)
                return self._error(data, qsection, BADVERS, mode, qlabel, transport)
        if not allowed:
            return self._error(data, qsection, REFUSED, mode, qlabel, transport)
        key = qsection + MODE_BYTES[mode]
        entry = self.cache.entries.get(key) or self.cache.build(key, wire, qtype, qclass, mode)
        if entry is None:
            return self._forward(data, qsection, mode, limit, transport)
        # The answer repeats the question in its canonical form (lowercase, uncompressed).
        return self._serve(entry, data, wire, wire, 12 + len(wire), limit, transport)

    def _error(self, data: bytes, question: bytes | None, rcode: int, mode: int, qtype: str, transport: int) -> bytes:
        self._queries[("", qtype, RCODE_NAMES.get(rcode, str(rcode)), TRANSPORTS[transport])] += 1
        if question is None and rcode == FORMERR:
            return header_only(data, rcode)
        return error_reply(data, question, rcode, mode, self.cache.ra)

    def _forward(self, data: bytes, question: bytes, mode: int, limit: int, transport: int) -> Forward:
        qtype = (question[-4] << 8) | question[-3]
        return Forward(
            data, question, mode, TCP_LIMIT if transport else limit, QTYPE_LABELS.get(qtype, "other"), transport
        )


def _qtype_label(data: bytes, nend: int) -> str:
    return QTYPE_LABELS.get((data[nend] << 8) | data[nend + 1], "other")
