"""A real DNS server on loopback for routing tests, built on dnslib.

It listens on UDP and TCP at 127.0.0.1 on one OS-picked port and answers from a zone
that a test sets in zone-file syntax (with TTLs). A name with no records is NXDOMAIN;
a name with records of other types gets an empty answer. Negative answers carry an SOA
whose MINIMUM is ``negative_ttl``. ``mode`` makes every answer SERVFAIL, or silence.
Every question is counted in ``queries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import textwrap
from collections.abc import AsyncIterator
from typing import Literal, cast

from dnslib import QTYPE, RCODE, RR, SOA, DNSLabel, DNSRecord

Mode = Literal["answer", "servfail", "silent"]


class LoopbackDns:
    """The zone, the mode and the questions seen; ``port`` once started."""

    def __init__(self) -> None:
        self.records: list[RR] = []
        self.mode: Mode = "answer"
        self.negative_ttl = 30
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def set_zone(self, text: str) -> None:
        """Replace the zone with records in zone-file syntax, e.g. ``a.test. 60 IN A 1.2.3.4``."""
        self.records = RR.fromZone(textwrap.dedent(text))

    def count(self, name: str, qtype: str | None = None) -> int:
        """How many questions for ``name`` (and ``qtype``, if given) were asked."""
        name = name.rstrip(".").lower()
        return sum(1 for n, t in self.queries if n == name and qtype in (None, t))

    def answer(self, packet: bytes) -> bytes | None:
        """The reply to one query, or None to stay silent."""
        request = DNSRecord.parse(packet)
        qname, qtype = request.q.qname, request.q.qtype
        self.queries.append((str(qname).rstrip(".").lower(), QTYPE.get(qtype)))
        if self.mode == "silent":
            return None
        reply = request.reply()
        if self.mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())
        owned = [rr for rr in self.records if rr.rname == qname]
        for rr in owned:
            if rr.rtype == qtype:
                reply.add_answer(rr)
        if not reply.rr:
            if not owned:
                reply.header.rcode = RCODE.NXDOMAIN
            soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, self.negative_ttl))
            reply.add_auth(RR(DNSLabel("."), QTYPE.SOA, rdata=soa, ttl=self.negative_ttl))
        return bytes(reply.pack())


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, dns: LoopbackDns) -> None:
        self.dns = dns
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        reply = self.dns.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _serve_tcp(dns: LoopbackDns, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    """Answer length-prefixed queries until the client closes (at most 1000)."""
    try:
        for _query in range(1000):
            header = await reader.readexactly(2)
            reply = dns.answer(await reader.readexactly(struct.unpack("!H", header)[0]))
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def loopback_dns() -> AsyncIterator[LoopbackDns]:
    """A started server; UDP and TCP share one OS-picked port on 127.0.0.1."""
    dns = LoopbackDns()
    loop = asyncio.get_running_loop()
    for _attempt in range(20):
        udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(dns),
                                                     local_addr=("127.0.0.1", 0))
        port = udp.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(lambda r, w: _serve_tcp(dns, r, w),
                                             "127.0.0.1", port)
        except OSError:
            udp.close()
            continue
        break
    else:
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
    dns.port = port
    try:
        yield dns
    finally:
        tcp.close()
        udp.close()
        await tcp.wait_closed()
