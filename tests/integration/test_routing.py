"""Next-hop routing against a real DNS server on loopback (tests/support/dns.py)."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Sequence

import dns.asyncquery
import dns.message
import pytest

from mta.config import DeliverySection, RouteSection
from mta.delivery.outbound.session import OutboundConnection
from mta.delivery.outbound.transaction import Transaction
from mta.delivery.routing import Router
from mta.errors import RoutePermFailure, RouteTempFailure
from tests.support.dns import LoopbackDns, loopback_dns
from tests.support.sink import running_sink

TIMEOUT = 0.5


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dns_server() -> AsyncIterator[LoopbackDns]:
    async with loopback_dns() as server:
        yield server


def make_router(server: LoopbackDns, routes: Sequence[RouteSection] = (), *,
                rng: random.Random | None = None, clock: FakeClock | None = None,
                mx_port: int = 2525) -> Router:
    delivery = DeliverySection(routes=tuple(routes), nameservers=("127.0.0.1",),
                               dns_port=server.port, dns_timeout=TIMEOUT, mx_port=mx_port)
    return Router(delivery, rng=rng or random.Random(0), clock=clock or FakeClock())


async def test_mx_hosts_are_tried_in_preference_order(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test.     300 IN MX 20 mx2.example.test.
        example.test.     300 IN MX 10 mx1.example.test.
        mx1.example.test. 300 IN A 192.0.2.1
        mx1.example.test. 300 IN AAAA 2001:db8::1
        mx2.example.test. 300 IN A 192.0.2.2
    """)
    hop = await make_router(dns_server).next_hop("Example.TEST.")
    assert [(h.name, h.preference, h.addresses) for h in hop.hosts] == [
        ("mx1.example.test", 10, ("192.0.2.1", "2001:db8::1")),
        ("mx2.example.test", 20, ("192.0.2.2",)),
    ]
    assert (hop.source, hop.port, hop.tls, hop.username) == ("mx", 2525, "opportunistic", None)
    assert hop.key == "mx:mx1.example.test,mx2.example.test"


async def test_equal_preferences_are_shuffled_by_the_rng(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test.  300 IN MX 10 a.example.test.
        example.test.  300 IN MX 10 b.example.test.
        example.test.  300 IN MX 20 c.example.test.
        a.example.test. 300 IN A 192.0.2.1
        b.example.test. 300 IN A 192.0.2.2
        c.example.test. 300 IN A 192.0.2.3
    """)
    orders = set()
    keys = set()
    for seed in (0, 1):
        hop = await make_router(dns_server, rng=random.Random(seed)).next_hop("example.test")
        orders.add(tuple(h.name for h in hop.hosts))
        keys.add(hop.key)
    assert orders == {
        ("a.example.test", "b.example.test", "c.example.test"),
        ("b.example.test", "a.example.test", "c.example.test"),
    }
    assert keys == {"mx:a.example.test,b.example.test,c.example.test"}


async def test_no_mx_falls_back_to_the_domains_own_addresses(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test. 300 IN A 192.0.2.7
        example.test. 300 IN AAAA 2001:db8::7
    """)
    hop = await make_router(dns_server).next_hop("example.test")
    assert hop.source == "a"
    assert [(h.name, h.addresses) for h in hop.hosts] == [
        ("example.test", ("192.0.2.7", "2001:db8::7")),
    ]
    assert hop.port == 2525


async def test_null_mx_is_a_permanent_failure(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test. 300 IN MX 0 .
        example.test. 300 IN A 192.0.2.1
    """)
    with pytest.raises(RoutePermFailure) as caught:
        await make_router(dns_server).next_hop("example.test")
    assert caught.value.evidence == "null MX (RFC 7505)"
    assert dns_server.count("example.test", "A") == 0


async def test_nxdomain_is_a_permanent_failure(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("other.test. 300 IN A 192.0.2.1")
    router = make_router(dns_server)
    with pytest.raises(RoutePermFailure) as caught:
        await router.next_hop("example.invalid")
    assert caught.value.evidence == "NXDOMAIN for example.invalid"
    assert caught.value.cache_for == dns_server.negative_ttl
    with pytest.raises(RoutePermFailure):
        await router.next_hop("example.invalid")
    assert dns_server.count("example.invalid") == 1, "the negative answer is cached"


async def test_servfail_is_a_temporary_failure_and_not_cached(dns_server: LoopbackDns) -> None:
    dns_server.mode = "servfail"
    router = make_router(dns_server)
    for _ in range(2):
        with pytest.raises(RouteTempFailure) as caught:
            await router.next_hop("example.test")
        assert caught.value.evidence == "SERVFAIL for example.test MX"
    assert dns_server.count("example.test", "MX") == 2


async def test_silent_server_is_a_temporary_failure_after_the_timeout(
    dns_server: LoopbackDns,
) -> None:
    dns_server.mode = "silent"
    started = time.monotonic()
    with pytest.raises(RouteTempFailure) as caught:
        await make_router(dns_server).next_hop("example.test")
    elapsed = time.monotonic() - started
    assert caught.value.evidence == "DNS timeout for example.test MX"
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.5
    assert dns_server.count("example.test", "MX") >= 1


async def test_answers_are_cached_until_the_smallest_ttl(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test.     300 IN MX 10 mx1.example.test.
        mx1.example.test.  60 IN A 192.0.2.1
    """)
    clock = FakeClock()
    router = make_router(dns_server, clock=clock)
    first = await router.next_hop("example.test")
    assert first.expires_at == clock.now + 60
    clock.now += 59
    assert await router.next_hop("example.test") == first
    assert dns_server.count("example.test", "MX") == 1
    clock.now += 2
    again = await router.next_hop("example.test")
    assert dns_server.count("example.test", "MX") == 2
    assert again.expires_at == clock.now + 60


async def test_unresolvable_mx_host_is_skipped(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test.     300 IN MX 10 gone.example.test.
        example.test.     300 IN MX 20 mx2.example.test.
        mx2.example.test. 300 IN A 192.0.2.2
    """)
    hop = await make_router(dns_server).next_hop("example.test")
    assert [h.name for h in hop.hosts] == ["mx2.example.test"]
    assert hop.key == "mx:gone.example.test,mx2.example.test"


async def test_no_usable_mx_host_is_a_temporary_failure(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("example.test. 300 IN MX 10 gone.example.test.")
    with pytest.raises(RouteTempFailure) as caught:
        await make_router(dns_server).next_hop("example.test")
    assert caught.value.evidence.startswith("no MX host of example.test resolves:")
    assert "NXDOMAIN for gone.example.test" in caught.value.evidence


async def test_static_routes_win_over_dns(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("""
        example.test. 300 IN MX 10 mx1.example.test.
        other.test.   300 IN MX 10 mx1.example.test.
        mx1.example.test. 300 IN A 192.0.2.1
    """)
    routes = [
        RouteSection(domain="*", host="127.0.0.1", port=2526, tls="none"),
        RouteSection(domain="Example.test", host="::1", port=587, tls="required",
                     username="relay", password="secret"),
    ]
    router = make_router(dns_server, routes)
    exact = await router.next_hop("example.test")
    assert (exact.source, exact.port, exact.tls) == ("route", 587, "required")
    assert (exact.username, exact.password) == ("relay", "secret")
    assert [(h.name, h.addresses) for h in exact.hosts] == [("::1", ("::1",))]
    wildcard = await router.next_hop("other.test")
    assert (wildcard.source, wildcard.port, wildcard.tls) == ("route", 2526, "none")
    assert wildcard.key == "route:127.0.0.1:2526/none"
    assert dns_server.queries == []


async def test_smarthost_name_is_resolved(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("smarthost.test. 120 IN A 192.0.2.9")
    clock = FakeClock()
    router = make_router(dns_server, [RouteSection(domain="*", host="smarthost.test", port=587)],
                         clock=clock)
    hop = await router.next_hop("example.test")
    assert [(h.name, h.addresses) for h in hop.hosts] == [("smarthost.test", ("192.0.2.9",))]
    assert hop.expires_at == clock.now + 120
    assert dns_server.count("example.test") == 0


async def test_dead_primary_mx_is_first_and_delivery_falls_over_to_secondary(
    dns_server: LoopbackDns,
) -> None:
    async with running_sink() as sink:
        dns_server.set_zone("""
            example.test.      300 IN MX 10 dead.example.test.
            example.test.      300 IN MX 20 live.example.test.
            dead.example.test. 300 IN A 127.0.0.2
            live.example.test. 300 IN A 127.0.0.1
        """)
        hop = await make_router(dns_server, mx_port=sink.port).next_hop("example.test")
        assert [(h.name, h.addresses) for h in hop.hosts] == [
            ("dead.example.test", ("127.0.0.2",)),
            ("live.example.test", ("127.0.0.1",)),
        ]
        conn = OutboundConnection(hop, ehlo_name="relay.origin.test",
                                  timeouts=DeliverySection(connect_timeout=5,
                                                            greeting_timeout=5))
        (result,) = await conn.send(Transaction(
            "a@origin.test", ["r@example.test"],
            b"Message-ID: <mx@test>\r\n\r\nbody\r\n"), before_data=_nothing)
        await conn.close()
        assert result.code == 250, result
        assert conn.peer == f"live.example.test[127.0.0.1]:{sink.port}"
        assert [t.message_id for t in sink.transactions] == ["mx@test"]


async def _nothing() -> None:
    """A ``before_data`` that journals nothing."""


async def test_loopback_dns_answers_over_tcp(dns_server: LoopbackDns) -> None:
    dns_server.set_zone("example.test. 300 IN MX 10 mx1.example.test.")
    query = dns.message.make_query("example.test", "MX")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", timeout=5, port=dns_server.port)
    assert [rr.to_text() for rr in response.answer[0]] == ["10 mx1.example.test."]
