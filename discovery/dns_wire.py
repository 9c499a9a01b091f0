"""DNS wire format by hand, for the few things the hot path needs (sans-IO: bytes in, bytes out).

dnslib parses and builds whole messages, at ~100 us a parse: too slow to run per query when
the answer is already encoded in a cache. A query from a stub resolver has a fixed shape
(RFC 1035 section 4.1, RFC 6891 section 6.1.2), and this module reads exactly that shape:

    offset 0   ID (2) | flags (2) | QDCOUNT=1 | ANCOUNT=0 | NSCOUNT=0 | ARCOUNT=0 or 1
    offset 12  QNAME: labels (length byte 1-63, then the bytes), ending with a zero byte
               QTYPE (2) | QCLASS (2)
    [OPT RR]   root name (a zero byte) | TYPE=41 | CLASS=requestor's UDP payload size |
               TTL = extended RCODE (1), VERSION (1), DO bit + Z (2) | RDLEN (2) | options

Anything else (a compression pointer in the question, a second additional record, trailing
bytes, EDNS version 1) is not an error here: :func:`scan_query` says "not the simple shape"
and the caller falls back to dnslib's full parser, which decides between FORMERR and an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

# Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2): byte 2 is QR|Opcode(4)|AA|TC|RD,
# byte 3 is RA|Z|AD|CD|RCODE(4).
QR = 0x80
AA = 0x04
TC = 0x02
RD = 0x01
RA = 0x80
CD = 0x10

# RCODEs
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended: the upper 8 bits (1) go in the OPT record's TTL, the lower 4 (0) in the header

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}

# Record types and classes
T_A, T_NS, T_SOA, T_PTR, T_TXT, T_AAAA, T_SRV, T_OPT, T_ANY = 1, 2, 6, 12, 16, 28, 33, 41, 255
C_IN, C_ANY = 1, 255

# Metric labels for the types people ask for; every other type counts as "other" so that a
# client spraying all 65536 types cannot blow up the number of series.
QTYPE_LABELS = {
    T_A: "A",
    T_NS: "NS",
    T_SOA: "SOA",
    T_PTR: "PTR",
    T_TXT: "TXT",
    T_AAAA: "AAAA",
    T_SRV: "SRV",
    T_ANY: "ANY",
    65: "HTTPS",
    64: "SVCB",
    15: "MX",
    5: "CNAME",
}

NO_EDNS_PAYLOAD = 512  # RFC 1035: a UDP answer without EDNS fits in 512 bytes
# What we advertise and the most we send over UDP whatever the client offers: 1232 avoids IP
# fragmentation on any path with a 1280-byte IPv6 MTU (DNS flag day 2020).
MAX_UDP_PAYLOAD = 1232

# The "mode" of a query: the bits of the request that change the bytes of the answer besides
# the ID. Answers are cached per mode so that serving one is a dictionary lookup and a
# concatenation, never a bit-patch: RD | CD<<1 | EDNS<<2 | DO<<3, where EDNS is
# whether the query had an OPT record and DO its DNSSEC-OK bit (RFC 3225 says it is copied).
# MODE_DO is only ever set together with MODE_EDNS.
MODE_RD = 1
MODE_CD = 2
MODE_EDNS = 4
MODE_DO = 8
MODE_BYTES = tuple(bytes((i,)) for i in range(16))
_HEADER_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT=1, ANCOUNT=0, NSCOUNT=0


def scan_query(data: bytes) -> tuple[int, int, int] | None:
    """``(end of qname, mode, UDP payload limit)`` for a query of the simple shape, else None.

    The end of the qname is the offset of QTYPE; the question ends 4 bytes later. The caller
    has already checked ``len(data) >= 12``, QR=0 and opcode QUERY.
    """
    if data[4:10] != _HEADER_ONE_QUESTION:
        return None
    pos = 12
    try:
        length = data[pos]
        while length:
            if length > 63:  # a compression pointer (0xC0) or a reserved label type
                return None
            pos += length + 1
            length = data[pos]
    except IndexError:
        return None
    nend = pos + 1
    if nend - 12 > 255:  # RFC 1035 2.3.4: a name is at most 255 bytes on the wire
        return None
    mode = (data[2] & RD) | (MODE_CD if data[3] & CD else 0)
    end = nend + 4
    arcount = data[11] if data[10] == 0 else 2
    if arcount == 0:
        return (nend, mode, NO_EDNS_PAYLOAD) if len(data) == end else None
    if arcount != 1:
        return None
    # The one additional record must be an OPT of EDNS version 0 and the last thing in the
    # message: root name, TYPE 41, CLASS = payload size, TTL = ext-rcode|version|flags, RDLEN.
    if len(data) < end + 11 or data[end] != 0 or data[end + 1 : end + 3] != b"\x00\x29":
        return None
    if data[end + 6] != 0:  # EDNS version: only 0 exists; others get BADVERS on the slow path
        return None
    if len(data) != end + 11 + int.from_bytes(data[end + 9 : end + 11], "big"):
        return None
    mode |= (MODE_EDNS | MODE_DO) if data[end + 7] & 0x80 else MODE_EDNS
    payload = int.from_bytes(data[end + 3 : end + 5], "big")
    return nend, mode, min(max(payload, NO_EDNS_PAYLOAD), MAX_UDP_PAYLOAD)


def name_labels(wire: bytes) -> tuple[bytes, ...]:
    """The labels of an uncompressed wire-format name (as :func:`scan_query` accepted it)."""
    labels = []
    pos = 0
    while wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += length + 1
    return tuple(labels)


def name_wire(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def header_only(query: bytes, rcode: int) -> bytes:
    """An answer that is the 12-byte header alone: the query's ID, opcode and RD echoed, QR
    set, every count 0. For FORMERR, where the question itself may be what is broken."""
    return query[:2] + bytes((QR | (query[2] & 0x79), rcode & 0x0F)) + b"\x00" * 8


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """A query as the slow path understood it (via dnslib), normalised to what the cache needs."""

    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    mode: int
    payload: int  # the UDP limit: 512 without EDNS, else the client's size within 512-1232
    edns_version: int | None  # None without an OPT record


def error_reply(query: bytes, question: bytes | None, rcode: int, mode: int, ra: bool) -> bytes:
    """An answer with no records: the header (ID, opcode, RD and CD echoed), the question when
    it could be read, and an OPT record when the query had one (RFC 6891 7: a responder that
    understood EDNS says so, also in errors). ``rcode`` may be extended (BADVERS)."""
    opt = b""
    if mode & MODE_EDNS:
        flags = b"\x80\x00" if mode & MODE_DO else b"\x00\x00"
        opt = b"\x00\x00\x29" + MAX_UDP_PAYLOAD.to_bytes(2, "big") + bytes((rcode >> 4, 0)) + flags + b"\x00\x00"
    byte2 = QR | (query[2] & 0x79)  # opcode and RD from the query
    byte3 = (RA if ra else 0) | (query[3] & CD) | (rcode & 0x0F)
    counts = (b"\x00\x01" if question else b"\x00\x00") + b"\x00\x00\x00\x00" + (b"\x00\x01" if opt else b"\x00\x00")
    return query[:2] + bytes((byte2, byte3)) + counts + (question or b"") + opt


def truncate_reply(reply: bytes, question_end: int) -> bytes:
    """A forwarded answer too big for the client's UDP limit, cut to header + question with TC
    set, so the client retries over TCP (RFC 1035 4.2.1). Its OPT record is dropped with the
    rest: a client that sees TC does not read the sections."""
    return reply[:2] + bytes((reply[2] | TC, reply[3])) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + reply[12:question_end]


def question_end(message: bytes) -> int | None:
    """Where the first question of a message with an uncompressed qname ends, or None."""
    pos = 12
    try:
        while message[pos]:
            if message[pos] > 63:
                return None
            pos += message[pos] + 1
    except IndexError:
        return None
    end = pos + 5
    return end if end <= len(message) else None
