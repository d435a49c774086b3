"""STARTTLS, implicit TLS and AUTH: encryption first, then credentials, then submission (I10)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
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
from tests.support.intake import assert_closed_by_server, running_node, store_of, stored_content
from tests.support.nodes import NodeHandle, wait_for
from tests.support.smtp import RawSMTP, queue_id_of

SettingsFactory = Callable[..., Settings]
USER = "submitter"
PASSWORD = "correct horse battery staple"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
BODY = b"Subject: over TLS\r\n\r\nsecret\r\n"


@pytest.fixture
def tls_settings(make_settings: SettingsFactory, ca: trustme.CA,
                 tmp_path: Path) -> Callable[..., Settings]:
    """Settings with a certificate, the implicit TLS listener, one user, and loopback
    outside ``allowed_networks`` (so it must authenticate)."""
    cert = ca.issue_cert("127.0.0.1", "mx.test.invalid")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))

    def build(*, with_user: bool = True, **smtp: object) -> Settings:
        return make_settings(
            smtp={"tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
                  "tls_listen": "127.0.0.1:0", "allowed_networks": ["10.0.0.0/8"], **smtp},
            users=[{"name": USER, "password_hash": hash_password(PASSWORD)}] if with_user else [],
        )

    return build


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that verifies the server against the test CA, hostname included."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def plain_credentials(user: str, password: str) -> str:
    return b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return b64encode(text.encode()).decode()


def capabilities(ehlo_reply: str) -> set[str]:
    return {line[4:] for line in ehlo_reply.split("\n")[1:]}


async def starttls(port: int, context: ssl.SSLContext) -> RawSMTP:
    """A session upgraded with STARTTLS (certificate verified) and greeted again."""
    client = await RawSMTP.connect(port)
    assert "STARTTLS" in capabilities(await client.cmd("EHLO client.test"))
    assert await client.cmd("STARTTLS") == replies.START_TLS
    await client.writer.start_tls(context, server_hostname="127.0.0.1")
    return client


async def submit_and_check(node: NodeHandle, client: RawSMTP, protocol: bytes) -> str:
    """Submit ``BODY`` and check it is stored as sent, its Received: naming ``protocol``."""
    reply = await client.submit("alice@example.org", ["bob@example.com"], BODY)
    await client.close()
    trace, body = await stored_content(node, reply)
    assert body == BODY
    assert protocol in trace
    return reply


async def test_starttls_is_offered_and_the_certificate_verifies(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        tls = client.writer.get_extra_info("ssl_object")
        assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
        caps = capabilities(await client.cmd("EHLO client.test"))
        assert "STARTTLS" not in caps, "not offered twice"
        assert "AUTH PLAIN LOGIN" in caps
        await client.close()


async def test_a_client_without_the_ca_refuses_the_certificate(
    tls_settings: Callable[..., Settings],
) -> None:
    async with running_node(tls_settings()) as node:
        assert node.tls_port is not None
        with pytest.raises(ssl.SSLCertVerificationError):
            await RawSMTP.connect(node.tls_port, ssl_context=ssl.create_default_context())


async def test_auth_is_not_offered_and_refused_with_538_before_tls(
    tls_settings: Callable[..., Settings],
) -> None:
    async with running_node(tls_settings()) as node:
        client = await RawSMTP.connect(node.port)
        caps = capabilities(await client.cmd("EHLO client.test"))
        assert not any(cap.startswith("AUTH") for cap in caps)
        assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}") == (
            replies.AUTH_NEEDS_TLS
        )
        assert await client.cmd("AUTH LOGIN") == replies.AUTH_NEEDS_TLS
        assert replies.AUTH_NEEDS_TLS.startswith("538 5.7.11 ")
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_AUTHORISED
        await client.close()
        assert await store_of(node).message_count() == 0


async def test_auth_plain_after_starttls_lets_an_outside_client_submit(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_AUTHORISED
        assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}") == AUTH_OK
        reply = await submit_and_check(node, client, b" with ESMTPSA id ")
        record = await store_of(node).message(parse_queue_id(queue_id_of(reply)))
        assert record is not None and record.auth_user == USER


async def test_auth_plain_with_a_challenge_works(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        assert await client.cmd("AUTH PLAIN") == "334 "
        assert await client.cmd(plain_credentials(USER, PASSWORD)) == AUTH_OK
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
        await client.close()


async def test_auth_login_after_starttls_lets_an_outside_client_submit(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        assert await client.cmd("AUTH LOGIN") == f"334 {b64('Username:')}"
        assert await client.cmd(b64(USER)) == f"334 {b64('Password:')}"
        assert await client.cmd(b64(PASSWORD)) == AUTH_OK
        assert (await client.cmd("AUTH LOGIN")).startswith("503 "), "already authenticated"
        await submit_and_check(node, client, b" with ESMTPSA id ")


async def test_wrong_password_gets_535_5_7_8_and_no_submission(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, 'wrong')}") == AUTH_INVALID
        assert await client.cmd(f"AUTH PLAIN {plain_credentials('nobody', PASSWORD)}") == (
            AUTH_INVALID
        )
        assert await client.cmd(f"AUTH LOGIN {b64(USER)}") == f"334 {b64('Password:')}"
        assert await client.cmd(b64("wrong")) == AUTH_INVALID
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_AUTHORISED
        assert await client.cmd("RCPT TO:<bob@example.com>") == replies.RELAY_DENIED
        await client.close()
        assert await store_of(node).message_count() == 0


async def test_auth_after_auth_failure_limit_failures_gets_421_4_7_0_and_disconnects(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings(auth_failure_limit=3)) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        for _ in range(3):
            assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, 'guess')}") == (
                AUTH_INVALID
            )
        reply = await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}")
        assert reply == replies.AUTH_THROTTLED
        assert reply.startswith("421 4.7.0 ")
        await assert_closed_by_server(client)

        again = await starttls(node.port, client_context)  # the block is per client address
        await again.cmd("EHLO client.test")
        assert await again.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}") == (
            replies.AUTH_THROTTLED
        )
        await assert_closed_by_server(again)
        assert await store_of(node).message_count() == 0


async def test_implicit_tls_listener_accepts_auth_and_submission(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings()) as node:
        assert node.tls_port is not None
        client = await RawSMTP.connect(node.tls_port, ssl_context=client_context)
        assert client.greeting.startswith("220 ")
        caps = capabilities(await client.cmd("EHLO client.test"))
        assert "AUTH PLAIN LOGIN" in caps
        assert "STARTTLS" not in caps
        assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}") == AUTH_OK
        await submit_and_check(node, client, b" with ESMTPSA id ")


async def test_tls_without_auth_from_an_allowed_network_is_recorded_as_esmtps(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings(allowed_networks=["127.0.0.0/8"])) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        await submit_and_check(node, client, b" with ESMTPS id ")


async def test_auth_is_not_offered_after_tls_when_no_users_are_configured(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    async with running_node(tls_settings(with_user=False)) as node:
        client = await starttls(node.port, client_context)
        caps = capabilities(await client.cmd("EHLO client.test"))
        assert not any(cap.startswith("AUTH") for cap in caps)
        assert (await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}")).startswith(
            "502 5.5.1 "
        )
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_AUTHORISED
        await client.close()


async def test_starttls_inside_tls_is_refused_in_step(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext,
) -> None:
    """TLS does not nest: inside a started or implicit TLS session, STARTTLS gets
    ``503 5.5.1`` and the session goes on."""
    async with running_node(tls_settings()) as node:
        started = await starttls(node.port, client_context)
        await started.cmd("EHLO client.test")
        assert await started.cmd("STARTTLS") == replies.ALREADY_TLS
        assert (await started.cmd("NOOP")).startswith("250 2.0.0")
        await started.close()
        assert node.tls_port is not None
        implicit = await RawSMTP.connect(node.tls_port, ssl_context=client_context)
        await implicit.cmd("EHLO client.test")
        assert await implicit.cmd("STARTTLS") == replies.ALREADY_TLS
        await implicit.close()


@pytest.mark.parametrize("mechanism", ["AUTH LOGIN", "AUTH PLAIN"])
async def test_an_endless_auth_line_gets_500_and_the_session_stays_in_step(
    tls_settings: Callable[..., Settings], client_context: ssl.SSLContext, mechanism: str,
) -> None:
    async with running_node(tls_settings()) as node:
        client = await starttls(node.port, client_context)
        await client.cmd("EHLO client.test")
        assert (await client.cmd(mechanism)).startswith("334 ")
        await client.send(b"A" * 100_000 + b"\r\n")
        assert await client.reply() == replies.AUTH_LINE_TOO_LONG
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
        assert await client.cmd(f"AUTH PLAIN {plain_credentials(USER, PASSWORD)}") == AUTH_OK
        await client.close()


async def test_a_failed_tls_handshake_is_a_client_fault_not_an_internal_error(
    tls_settings: Callable[..., Settings],
) -> None:
    """A client that answers 220 Ready with garbage: an info-level event with its reason,
    counted apart from the node's own errors."""
    async with running_node(tls_settings()) as node:
        client = await RawSMTP.connect(node.port)
        await client.cmd("EHLO client.test")
        assert await client.cmd("STARTTLS") == replies.START_TLS
        await client.send(b"this is not a TLS ClientHello\r\n" * 20)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(client.reader.read(), 5)
        await client.close()

        async def counted() -> bool:
            _, text = await admin_get(node.admin_port, "/metrics")
            return 'mta_intake_rejected_total{reason="tls_handshake_failed"} 1.0' in text

        await wait_for(counted, timeout=5)
        _, text = await admin_get(node.admin_port, "/metrics")
        assert 'mta_intake_rejected_total{reason="internal_error"} 0.0' in text
