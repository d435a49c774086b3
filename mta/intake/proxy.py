"""The PROXY protocol (v1 and v2) from the load balancers in ``smtp.proxy_protocol_from``.

A connection from a listed balancer must begin with a PROXY header that names the real
client; the session then judges that address (``allowed_networks``, AUTH throttling,
``max_sessions_per_client``, ``Received:``, logs). aiosmtpd parses the header; this
module decides who must send one, bounds the wait, and turns every way the header can
be wrong into a refusal reason (I3b: the bytes are hostile). Peers that are not listed
never get to send one. Like Postfix's ``smtpd_upstream_proxy_protocol``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, AsyncReader, get_proxy

from mta.mail.text import outside_text

#: Refusal reasons, as counted in ``mta_intake_rejected_total``.
HEADER_MISSING = "proxy_header_missing"
HEADER_INVALID = "proxy_header_invalid"
HEADER_NO_ADDRESS = "proxy_header_no_address"


@dataclass(frozen=True)
class ProxyOutcome:
    """The client address a PROXY header named, or why the connection is refused."""

    client_ip: str | None
    reason: str | None = None
    detail: str = ""


class ProxySources:
    """Which TCP peers are balancers that must send a PROXY header, and for how long."""

    def __init__(self, networks: Iterable[str], timeout: float) -> None:
        self._networks = [ipaddress.ip_network(net, strict=False) for net in networks]
        self.timeout = timeout
        self.listed = functools.lru_cache(maxsize=1024)(self._listed)

    def _listed(self, peer_ip: str | None) -> bool:
        """True if ``peer_ip`` is in one of the configured balancer networks."""
        if not self._networks or peer_ip is None:
            return False
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    async def read(self, reader: AsyncReader) -> ProxyOutcome:
        """Read one PROXY header within the timeout: the client's address, or a refusal."""
        try:
            data = await asyncio.wait_for(get_proxy(reader), self.timeout)
        except TimeoutError:
            return _refused(HEADER_MISSING, f"no header within {self.timeout}s")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            return _refused(HEADER_MISSING, f"closed before a header: {type(exc).__name__}")
        if not data.valid:
            return _refused(HEADER_INVALID, outside_text(data.error or "malformed"))
        if data.version == 2 and data.command != V2_CMD.PROXY:
            return _refused(HEADER_NO_ADDRESS, "a LOCAL header (a health check?)")
        if data.family not in (AF.INET, AF.INET6) or data.protocol != PROTO.STREAM \
                or data.src_addr is None:
            return _refused(HEADER_NO_ADDRESS, "the header names no TCP client address")
        address = ipaddress.ip_address(data.src_addr)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return ProxyOutcome(str(address))


def _refused(reason: str, detail: str) -> ProxyOutcome:
    return ProxyOutcome(None, reason, detail)
