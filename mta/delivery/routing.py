"""Next-hop routing: static routes first, then MX, then the domain's own address.

``Router.next_hop(domain)`` answers where mail for a recipient domain goes:

1. a static route for the exact domain, else the ``*`` route (a smarthost);
2. the domain's MX hosts, by preference, shuffled among equal preferences, each
   resolved to its addresses (a host that does not resolve is skipped);
3. with no MX records, the domain itself as an implicit MX (RFC 5321 5.1).

A null MX (RFC 7505) and NXDOMAIN raise ``RoutePermFailure``: evidence for ``failed``
(DESIGN.md I2). SERVFAIL, a timeout, or no usable host raise ``RouteTempFailure``.
Answers are cached per domain until the smallest TTL among the records used; permanent
answers for their TTL too; temporary failures never.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset

from mta.config import DeliverySection, RouteSection, TlsPolicy, UncertainMode
from mta.errors import ConfigError, RoutePermFailure, RouteTempFailure

__all__ = [
    "HopSource",
    "MailHost",
    "NextHop",
    "Router",
    "addresses_to_try",
    "match_route",
    "mx_key",
    "normalise_domain",
    "open_socket",
    "route_key",
    "route_table",
]

HopSource = Literal["mx", "a", "route"]

#: Seconds to cache NXDOMAIN when the answer carries no SOA (RFC 2308 negative TTL).
NEGATIVE_TTL_DEFAULT = 60.0
#: Cap on the cache lifetime of a hop that skipped a host after a temporary DNS error.
SKIPPED_HOST_TTL = 60.0
#: Addresses tried per delivery attempt, across all MX hosts (Postfix's
#: ``smtp_mx_address_limit``): a domain with many dead hosts cannot stall a worker long.
MAX_ADDRESSES_PER_ATTEMPT = 5


@dataclass(frozen=True)
class MailHost:
    """One host to try: its name, its addresses (IPv4 first) and its MX preference."""

    name: str
    addresses: tuple[str, ...]
    preference: int


@dataclass(frozen=True)
class NextHop:
    """Where a domain's mail goes: hosts in the order to try them, and how to talk to them.

    ``key`` groups recipients that share a destination: the same route, or the same
    set of MX names (in any order), gives the same key.
    """

    key: str
    hosts: tuple[MailHost, ...]
    port: int
    tls: TlsPolicy
    source: HopSource
    expires_at: float
    username: str | None = None
    password: str | None = None
    #: The route's choice after a lost reply to the dot (None: the node's default).
    uncertain_mode: UncertainMode | None = None
    #: The route's recipients per transaction (None: the node's default).
    recipients_per_transaction: int | None = None


def route_key(route: RouteSection) -> str:
    """The grouping key of a static route: everything that shapes its connection."""
    key = f"route:{route.host}:{route.port}/{route.tls}"
    return f"{key}/{route.username}" if route.username is not None else key


def mx_key(names: Sequence[str]) -> str:
    """The grouping key of an MX host set, independent of the order of the names."""
    return "mx:" + ",".join(sorted(set(names)))


def match_route(routes: dict[str, RouteSection], domain: str) -> RouteSection | None:
    """The route for ``domain``: an exact match wins over ``*``."""
    return routes.get(domain) or routes.get("*")


def route_table(routes: Sequence[RouteSection]) -> dict[str, RouteSection]:
    """Routes by normalised domain; a domain routed twice is a configuration error."""
    table: dict[str, RouteSection] = {}
    for route in routes:
        domain = normalise_domain(route.domain)
        if domain in table:
            raise ConfigError(f"two static routes for {route.domain!r}")
        table[domain] = route
    return table


def normalise_domain(domain: str) -> str:
    """Lower case, without surrounding blanks or a final dot."""
    return domain.strip().rstrip(".").lower()


class Router:
    """Finds and caches the next hop for recipient domains."""

    def __init__(
        self,
        delivery: DeliverySection,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        cache_size: int = 10_000,
    ) -> None:
        """Static routes, nameservers (none: resolv.conf), DNS port and timeout and the
        port of MX hosts come from ``delivery``."""
        self._routes = route_table(delivery.routes)
        self._mx_port = delivery.mx_port
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not delivery.nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ConfigError(f"no resolver nameservers configured: {exc}") from exc
        if delivery.nameservers:
            self._resolver.nameservers = list(delivery.nameservers)
        self._resolver.port = delivery.dns_port
        self._resolver.timeout = delivery.dns_timeout
        self._resolver.lifetime = delivery.dns_timeout
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._cache_size = cache_size
        self._cache: dict[str, NextHop | tuple[float, str]] = {}

    async def next_hop(self, domain: str) -> NextHop:
        """The next hop for ``domain``; raises ``RouteTempFailure`` or ``RoutePermFailure``."""
        domain = normalise_domain(domain)
        now = self._clock()
        cached = self._cache.get(domain)
        if isinstance(cached, NextHop) and cached.expires_at > now:
            return cached
        if isinstance(cached, tuple) and cached[0] > now:
            raise RoutePermFailure(cached[1], cache_for=cached[0] - now)
        try:
            hop = await self._lookup(domain, now)
        except RoutePermFailure as exc:
            self._remember(domain, (now + exc.cache_for, exc.evidence))
            raise
        self._remember(domain, hop)
        return hop

    def transaction_key(self, domain: str) -> str:
        """Which recipients may share an SMTP transaction with those at ``domain``: all
        that one static route takes (a smarthost carries any domains in one transaction,
        as Postfix's queue per next hop does), else the domain's own (its MX hosts are its
        own: no DNS lookup happens here)."""
        domain = normalise_domain(domain)
        route = match_route(self._routes, domain)
        return f"domain:{domain}" if route is None else f"route:{normalise_domain(route.domain)}"

    def _remember(self, domain: str, entry: NextHop | tuple[float, str]) -> None:
        self._cache.pop(domain, None)
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[domain] = entry

    async def _lookup(self, domain: str, now: float) -> NextHop:
        route = match_route(self._routes, domain)
        if route is not None:
            return await self._route_hop(route, now)
        mx = await self._query(domain, "MX")
        if mx is None:
            host, ttl = await self._resolve_host(domain, 0)
            return NextHop(key=mx_key([domain]), hosts=(host,), port=self._mx_port,
                           tls="opportunistic", source="a", expires_at=now + ttl)
        records = list(mx)
        if len(records) == 1 and (records[0].preference, records[0].exchange) == (0, dns.name.root):
            raise RoutePermFailure("null MX (RFC 7505)", cache_for=float(mx.ttl))
        names = self._ordered(mx)
        results = await asyncio.gather(*(self._resolve_host(name, pref) for name, pref in names),
                                       return_exceptions=True)
        hosts: list[MailHost] = []
        ttls = [float(mx.ttl)]
        skipped: list[str] = []
        for result in results:
            if isinstance(result, RouteTempFailure):
                skipped.append(result.evidence)
            elif isinstance(result, BaseException):
                raise result
            else:
                hosts.append(result[0])
                ttls.append(result[1])
        if not hosts:
            raise RouteTempFailure(f"no MX host of {domain} resolves: " + "; ".join(skipped))
        ttl = min(ttls) if not skipped else min(*ttls, SKIPPED_HOST_TTL)
        return NextHop(key=mx_key([name for name, _ in names]), hosts=tuple(hosts),
                       port=self._mx_port, tls="opportunistic", source="mx",
                       expires_at=now + ttl)

    def _ordered(self, mx: dns.rrset.RRset) -> list[tuple[str, int]]:
        """MX names by preference, shuffled with the injected rng among equal ones."""
        by_preference: dict[int, list[str]] = {}
        for rr in mx:
            if rr.exchange != dns.name.root:
                name = rr.exchange.to_text(omit_final_dot=True).lower()
                by_preference.setdefault(rr.preference, []).append(name)
        ordered: list[tuple[str, int]] = []
        for preference in sorted(by_preference):
            names = sorted(set(by_preference[preference]))
            self._rng.shuffle(names)
            ordered += [(name, preference) for name in names]
        return ordered

    async def _route_hop(self, route: RouteSection, now: float) -> NextHop:
        try:
            ipaddress.ip_address(route.host)
        except ValueError:
            host, ttl = await self._resolve_host(route.host, 0)
        else:
            host, ttl = MailHost(route.host, (route.host,), 0), math.inf
        return NextHop(key=route_key(route), hosts=(host,), port=route.port, tls=route.tls,
                       source="route", expires_at=now + ttl, username=route.username,
                       password=route.password, uncertain_mode=route.uncertain_mode,
                       recipients_per_transaction=route.recipients_per_transaction)

    async def _resolve_host(self, name: str, preference: int) -> tuple[MailHost, float]:
        """The host with its A then AAAA addresses, and their smallest TTL.

        Any failure, even NXDOMAIN, is temporary here: the host is skipped or, when
        it is the only one, the delivery waits (I2: no ``failed`` without proof).
        """
        results = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"),
                                       return_exceptions=True)
        addresses: list[str] = []
        ttls: list[float] = []
        problems: list[str] = []
        for result in results:
            if isinstance(result, RouteTempFailure | RoutePermFailure):
                problems.append(result.evidence)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None:
                addresses += [rr.address for rr in result]
                ttls.append(float(result.ttl))
        if not addresses:
            evidence = "; ".join(problems) or "no A or AAAA record"
            raise RouteTempFailure(f"{name} has no address: {evidence}")
        ttl = min(ttls) if not problems else min(*ttls, SKIPPED_HOST_TTL)
        return MailHost(name, tuple(addresses), preference), ttl

    async def _query(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        """The answer's records, or None when the name has none of this type."""
        try:
            qname = dns.name.from_text(name)
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                                  search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise RoutePermFailure(f"NXDOMAIN for {name}",
                                   cache_for=_negative_ttl(exc)) from exc
        except dns.resolver.NoNameservers as exc:  # every server failed: SERVFAIL or REFUSED
            raise RouteTempFailure(f"SERVFAIL for {name} {rdtype}") from exc
        except dns.exception.Timeout as exc:
            raise RouteTempFailure(f"DNS timeout for {name} {rdtype}") from exc
        except dns.exception.DNSException as exc:
            raise RouteTempFailure(f"DNS error for {name} {rdtype}: {exc}") from exc
        return answer.rrset


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308: the SOA's TTL capped by its MINIMUM field, else a small default."""
    responses = exc.responses()  # type: ignore[no-untyped-call]  # untyped in dnspython
    for response in responses.values():
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


def addresses_to_try(hosts: Sequence[MailHost]) -> list[tuple[MailHost, str]]:
    """Each host's addresses in order, at most ``MAX_ADDRESSES_PER_ATTEMPT`` in all."""
    pairs = [(host, address) for host in hosts for address in host.addresses]
    return pairs[:MAX_ADDRESSES_PER_ATTEMPT]


async def open_socket(address: str, port: int, *, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket (for ``aiosmtplib.SMTP(sock=...)``).

    Raises ``OSError`` or ``TimeoutError``; the socket is closed on any failure.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock
