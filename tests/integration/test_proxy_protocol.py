"""The PROXY protocol at intake, without a balancer: raw sockets play HAProxy.

A peer in ``smtp.proxy_protocol_from`` must begin with a v1 or v2 header; the address it
names is the client's for ``allowed_networks``, ``max_sessions_per_client``,
``Received:`` and the store. Anything else from it is closed without a greeting. A peer
that is not listed gets no say: a PROXY line from it is a bad command.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import struct
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from mta.config import Settings
from mta.intake import replies
from mta.intake.auth import hash_password
from mta.queue.ids import parse_queue_id
from tests.support.admin import admin_get
from tests.support.intake import running_node, store_of
from tests.support.nodes import NodeHandle
from tests.support.smtp import RawSMTP, queue_id_of

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
BALANCER = "127.0.0.1"
REAL_CLIENT = "127.0.0.5"
MESSAGE = b"Subject: proxied\r\n\r\nthrough a balancer\r\n.\r\n"


def v1(source: str = REAL_CLIENT, port: int = 40_000) -> bytes:
    """A PROXY v1 line naming ``source`` as the client."""
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 25\r\n".encode()


def v2(source: str = REAL_CLIENT, *, command: int = 0x1, fam_proto: int = 0x11,
       tlv: bytes = b"") -> bytes:
    """A PROXY v2 header (PROXY command, TCP over IPv4 by default) naming ``source``."""
    body = struct.pack("!4s4sHH", ipaddress.IPv4Address(source).packed,
                       ipaddress.IPv4Address("127.0.0.1").packed, 40_000, 25) + tlv
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, fam_proto, len(body)) + body


@pytest.fixture
def proxied_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings where loopback's 127.0.0.1 is the balancer and only 127.0.0.5 may submit."""
    def build(**smtp: object) -> Settings:
        return make_settings(smtp={"allowed_networks": [f"{REAL_CLIENT}/32"],
                                   "proxy_protocol_from": [f"{BALANCER}/32"],
                                   "proxy_protocol_timeout": 0.5, **smtp})
    return build


async def through_balancer(port: int, header: bytes) -> RawSMTP:
    """A connection from the balancer's address that sends ``header``, then reads the
    greeting."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, local_addr=(BALANCER, 0)), 5)
    client = RawSMTP(reader, writer)
    await client.send(header)
    client.greeting = await client.reply()
    return client


async def refused_without_greeting(port: int, payload: bytes, *, close: bool = False) -> None:
    """The balancer's connection sends ``payload`` (then EOF if ``close``) and is closed
    with nothing sent back."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, local_addr=(BALANCER, 0)), 5)
    writer.write(payload)
    if close:
        writer.write_eof()
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        rest = b""
    writer.close()
    assert rest == b"", f"{payload[:40]!r}: expected a silent close, got {rest!r}"


async def rejected(node: NodeHandle, reason: str) -> float:
    """``mta_intake_rejected_total`` for ``reason``, from the admin port."""
    status, text = await admin_get(node.admin_port, "/metrics")
    assert status == 200
    match = re.search(rf'^mta_intake_rejected_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


async def submit_and_check(node: NodeHandle, client: RawSMTP) -> None:
    """Submit one message and check the store holds the real client's address."""
    assert client.greeting.startswith("220 "), client.greeting
    assert (await client.cmd("EHLO app.test")).startswith("250-")
    reply = await client.submit("app@example.org", ["user@example.com"], MESSAGE)
    assert reply.startswith("250 "), reply
    message_id = parse_queue_id(queue_id_of(reply))
    record = await store_of(node).message(message_id)
    assert record is not None and record.client_address == REAL_CLIENT
    content = await store_of(node).message_content(message_id)
    assert content is not None
    assert content[0].startswith(f"Received: from app.test ([{REAL_CLIENT}])".encode()), content[0]
    await client.close()


@pytest.mark.parametrize("header", [v1(), v2(), v2(tlv=b"\x04\x00\x02xx")],
                         ids=["v1", "v2", "v2-with-tlv"])
async def test_a_listed_balancer_names_the_client_that_submits(
    proxied_settings: Callable[..., Settings], header: bytes,
) -> None:
    async with running_node(proxied_settings()) as node:
        await submit_and_check(node, await through_balancer(node.port, header))


async def test_the_real_address_is_refused_when_it_is_not_allowed(
    proxied_settings: Callable[..., Settings],
) -> None:
    async with running_node(proxied_settings()) as node:
        client = await through_balancer(node.port, v2("127.0.0.9"))
        assert client.greeting.startswith("220 "), client.greeting
        await client.cmd("EHLO app.test")
        assert await client.cmd("MAIL FROM:<app@example.org>") == replies.NOT_AUTHORISED
        await client.close()


async def test_sessions_per_client_count_the_real_address(
    proxied_settings: Callable[..., Settings],
) -> None:
    async with running_node(proxied_settings(max_sessions_per_client=1)) as node:
        first = await through_balancer(node.port, v1(REAL_CLIENT))
        other = await through_balancer(node.port, v1("127.0.0.6"))
        again = await through_balancer(node.port, v1(REAL_CLIENT))
        assert first.greeting.startswith("220 "), first.greeting
        assert other.greeting.startswith("220 "), other.greeting
        assert again.greeting == replies.TOO_MANY_FROM_CLIENT
        for client in (first, other, again):
            await client.close()


async def test_a_listed_peer_without_a_header_is_closed_without_a_greeting(
    proxied_settings: Callable[..., Settings],
) -> None:
    async with running_node(proxied_settings()) as node:
        await refused_without_greeting(node.port, b"")  # silent until the timeout
        await refused_without_greeting(node.port, b"EHLO app.test\r\n")
        await refused_without_greeting(node.port, b"PRO", close=True)
        assert await rejected(node, "proxy_header_missing") == 2
        assert await rejected(node, "proxy_header_invalid") == 1
        await submit_and_check(node, await through_balancer(node.port, v1()))


HOSTILE = {
    "v1-too-long": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    "v1-no-crlf-16k": b"PROXY " + b"x" * 20_000,
    "v1-bad-family": b"PROXY TCP9 127.0.0.5 127.0.0.1 1 25\r\n",
    "v1-bad-address": b"PROXY TCP4 127.0.0.500 127.0.0.1 1 25\r\n",
    "v1-port-out-of-range": b"PROXY TCP4 127.0.0.5 127.0.0.1 99999 25\r\n",
    "v1-binary": b"PROXY TCP4 \x00\xff\xfe\r\n",
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v2-bad-version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,
    "v2-bad-command": V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12,
    "v2-truncated-address": V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x7f\x00\x00\x05",
    "v2-local": v2(command=0x0, fam_proto=0x00),
    "v2-udp": v2(fam_proto=0x12),
    "v2-unix": V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/tmp/x".ljust(216, b"\x00"),
    "v2-wrong-signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00",
    "binary-junk": bytes(range(256)) * 4,
}


async def test_hostile_headers_are_refused_and_the_node_keeps_serving(
    proxied_settings: Callable[..., Settings],
) -> None:
    async with running_node(proxied_settings()) as node:
        for name, payload in HOSTILE.items():
            try:
                await refused_without_greeting(node.port, payload)  # each is whole
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
        refused = (await rejected(node, "proxy_header_invalid")
                   + await rejected(node, "proxy_header_no_address"))
        assert refused == len(HOSTILE)
        assert await rejected(node, "internal_error") == 0
        await submit_and_check(node, await through_balancer(node.port, v2()))


async def test_an_unlisted_peer_cannot_claim_an_address(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(smtp={"allowed_networks": [f"{REAL_CLIENT}/32"],
                                   "proxy_protocol_from": ["127.0.0.2/32"]})
    async with running_node(settings) as node:
        client = await RawSMTP.connect(node.port, source=BALANCER)
        assert client.greeting.startswith("220 "), client.greeting
        reply = await client.cmd(v1().decode().rstrip())
        assert reply.startswith("500 "), reply
        await client.cmd("EHLO app.test")
        assert await client.cmd("MAIL FROM:<app@example.org>") == replies.NOT_AUTHORISED
        await client.close()


async def test_auth_throttling_counts_the_real_address(
    proxied_settings: Callable[..., Settings], make_settings: Callable[..., Settings],
) -> None:
    settings = proxied_settings(auth_without_tls=True, auth_failure_limit=2)
    settings = settings.model_copy(update={"users": make_settings(
        users=[{"name": "app", "password_hash": hash_password("right")}]).users})
    wrong = b64encode(b"\0app\0wrong").decode()
    right = b64encode(b"\0app\0right").decode()
    async with running_node(settings) as node:
        guesser = await through_balancer(node.port, v1("127.0.0.7"))
        await guesser.cmd("EHLO guesser.test")
        for _ in range(2):
            assert (await guesser.cmd(f"AUTH PLAIN {wrong}")).startswith("535 ")
        assert await guesser.cmd(f"AUTH PLAIN {right}") == replies.AUTH_THROTTLED
        other = await through_balancer(node.port, v1("127.0.0.8"))  # same balancer
        await other.cmd("EHLO other.test")
        assert (await other.cmd(f"AUTH PLAIN {right}")).startswith("235 ")
        for client in (guesser, other):
            await client.close()


async def test_the_real_address_survives_starttls(
    proxied_settings: Callable[..., Settings], ca: trustme.CA, tmp_path: Path,
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with running_node(proxied_settings(tls_cert_file=str(cert_file),
                                             tls_key_file=str(key_file))) as node:
        client = await through_balancer(node.port, v2())
        await client.cmd("EHLO app.test")
        assert await client.cmd("STARTTLS") == replies.START_TLS
        await client.writer.start_tls(context, server_hostname="127.0.0.1")
        await submit_and_check(node, client)


def test_proxy_protocol_from_must_name_networks(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="not an IP network"):
        make_settings(smtp={"proxy_protocol_from": ["balancer.example"]})
