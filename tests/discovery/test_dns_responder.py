"""The responder without sockets: the fast path (a cache hit found by guessing where the question
ends) must give byte-for-byte the answer the checked path gives (the first query, a miss)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import pytest

from discovery.dns_cache import DnsAnswerCache
from discovery.dns_metrics import DnsStats
from discovery.dns_responder import TCP, UDP, DnsResponder, Forward
from discovery.dns_zone import DnsResolver
from tests.discovery.conftest import dns_config, instance, snapshot


def responder() -> DnsResponder:
    resolver = DnsResolver(dns_config(), forwarding=True)
    items = [instance("one-1", "one", "10.0.0.1", meta={"k": "v"})]
    items += [instance(f"m-{n:02}", "many", f"10.1.0.{n + 1}") for n in range(60)]  # ~1 KB of A records
    resolver.use(snapshot(*items))
    return DnsResponder(DnsAnswerCache(resolver, ra=True), DnsStats())


def make(name: str, rdtype: str = "A", flags: int | None = None, **kwargs: object) -> bytes:
    message = dns.message.make_query(name, rdtype, id=0x1234, **kwargs)  # type: ignore[arg-type]
    if flags is not None:
        message.flags = flags
    return message.to_wire()


QUERIES = {
    "plain": make("one.svc.internal"),
    "no RD": make("one.svc.internal", flags=0),
    "CD": make("one.svc.internal", flags=dns.flags.RD | dns.flags.CD),
    "mixed case": make("OnE.SVC.internal"),
    "TXT": make("one-1.one.svc.internal", "TXT"),
    "NXDOMAIN": make("nope.svc.internal"),
    "EDNS 512": make("one.svc.internal", use_edns=0, payload=512),
    "EDNS 4096": make("one.svc.internal", use_edns=0, payload=4096),
    "DO": make("one.svc.internal", want_dnssec=True),
    "EDNS with a cookie": make(
        "one.svc.internal", use_edns=0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")]
    ),
    "big, no EDNS": make("many.svc.internal"),
    "big, EDNS 600": make("many.svc.internal", use_edns=0, payload=600),
    "big, EDNS 1232": make("many.svc.internal", use_edns=0, payload=1232),
}


@pytest.mark.parametrize("name", list(QUERIES))
@pytest.mark.parametrize("transport", [UDP, TCP])
def test_hit_equals_miss(name: str, transport: int) -> None:
    wire = QUERIES[name]
    first = responder()
    miss = first.respond(wire, True, transport)
    assert first.cache.builds == 1
    hit = first.respond(wire, True, transport)
    assert first.cache.builds == 1  # served from the cache
    assert isinstance(miss, bytes) and isinstance(hit, bytes)
    parsed_miss, parsed_hit = dns.message.from_wire(miss), dns.message.from_wire(hit)
    # "many" rotates between answers: compare as sets, everything else byte for byte.
    if name.startswith("big"):
        assert parsed_hit.flags == parsed_miss.flags
        assert {r.to_text() for s in parsed_hit.answer for r in s} == {
            r.to_text() for s in parsed_miss.answer for r in s
        }
        assert (parsed_hit.edns, parsed_hit.payload) == (parsed_miss.edns, parsed_miss.payload)
    else:
        assert hit == miss
    query = dns.message.from_wire(wire)
    assert query.is_response(parsed_hit)
    assert parsed_hit.question[0].name.to_text() == query.question[0].name.to_text()  # same case
    assert (parsed_hit.flags & dns.flags.RD) == (query.flags & dns.flags.RD)
    assert (parsed_hit.flags & dns.flags.CD) == (query.flags & dns.flags.CD)
    assert parsed_hit.edns == query.edns
    if query.edns >= 0:
        assert (parsed_hit.ednsflags & dns.flags.DO) == (query.ednsflags & dns.flags.DO)
    limit = 65535 if transport == TCP else (max(512, min(query.payload, 1232)) if query.edns >= 0 else 512)
    assert len(hit) <= limit
    truncated = bool(parsed_hit.flags & dns.flags.TC)
    assert truncated == (name in ("big, no EDNS", "big, EDNS 600") and transport == UDP)


def test_refused_and_forward_do_not_touch_the_cache() -> None:
    r = responder()
    refused = r.respond(QUERIES["plain"], False, UDP)
    assert isinstance(refused, bytes) and refused[3] & 0x0F == 5
    assert r.cache.builds == 0
    forward = r.respond(make("example.com"), True, UDP)
    assert isinstance(forward, Forward)
    assert forward.limit == 512 and forward.qtype == "A"
    assert r.cache.entries == {}
