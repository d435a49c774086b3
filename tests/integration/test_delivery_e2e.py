"""Delivery end to end: client -> intake -> store -> deliverer -> a recording sink."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mta.config import Settings
from tests.support.admin import metric
from tests.support.bad_peer import BadPeer, running_bad_peer
from tests.support.delivery import delivery_states, submit_tagged
from tests.support.dns import loopback_dns
from tests.support.intake import store_of
from tests.support.nodes import NodeHandle, start_node, wait_for
from tests.support.sink import Faults, Sink
from tests.support.smtp import RawSMTP


def delivery_settings(make_settings: Callable[..., Settings], sink: Sink,
                      **delivery: Any) -> Settings:
    return make_settings(delivery={
        "enabled": True, "poll_interval": 60.0, "minimal_backoff": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
        **delivery,
    })


async def states(node: NodeHandle, message_id: uuid.UUID) -> dict[str, str]:
    return await delivery_states(store_of(node), message_id)


async def test_accepted_mail_is_delivered_at_once_in_one_transaction(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    """A 60 s poll interval: only the wake-up from intake can deliver within the deadline.
    The recipients' two domains share the node's one route, so one transaction carries
    all three."""
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        recipients = ["a@example.com", "b@example.com", "c@other.example"]
        message_id = await submit_tagged(node.port, "m1", recipients=recipients)
        await sink.wait_for_count(3, timeout=5)
        await wait_for(lambda: _all(node, message_id, "delivered"), timeout=5)
        assert sink.count("m1@test", "a@example.com") == 1
        assert [sorted(t.recipients) for t in sink.transactions] == [sorted(recipients)]
        deliveries = await store_of(node).deliveries(message_id)
        assert all(d.last_reply_code == 250 for d in deliveries)
        events = await store_of(node).delivery_events(deliveries[0].id)
        assert events[-1].state == "delivered" and events[-1].reply_code == 250
        delivered = sum(
            sample.value for metric in node.node.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "mta_delivery_outcomes_total"
            and sample.labels["outcome"] == "delivered")
        assert delivered == 3
    finally:
        await node.stop()


async def _all(node: NodeHandle, message_id: uuid.UUID, state: str) -> bool:
    return set((await states(node, message_id)).values()) == {state}


async def test_a_5xx_fails_the_recipient_and_sends_one_dsn_to_the_sender(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    sink.faults = Faults(reject={"gone@example.com": "550 5.1.1 no such user"})
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        message_id = await submit_tagged(node.port, "m2",
                                         recipients=["gone@example.com", "here@example.com"])
        await wait_for(lambda: _dsn_delivered(sink), timeout=10)
        found = await states(node, message_id)
        assert found == {"gone@example.com": "failed", "here@example.com": "delivered"}
        dsns = [t for t in sink.transactions if t.mail_from == "" and t.reply.startswith("2")]
        assert len(dsns) == 1 and list(dsns[0].recipients) == ["app@example.org"]
        unfolded = dsns[0].data.replace(b"\r\n ", b" ")
        assert b"Diagnostic-Code: smtp; 550 5.1.1 no such user" in unfolded, unfolded
        assert b"Status: 5.1.1" in unfolded and b"Final-Recipient: rfc822; gone@example.com" \
            in unfolded
        assert b'report-type="delivery-status"' in dsns[0].data
    finally:
        await node.stop()


def _dsn_delivered(sink: Sink) -> bool:
    return any(t.mail_from == "" for t in sink.transactions)


async def test_no_dsn_for_the_null_sender(make_settings: Callable[..., Settings],
                                          sink: Sink) -> None:
    sink.faults = Faults(reject={"gone@example.com": "550 5.1.1 no such user"})
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        message_id = await submit_tagged(node.port, "m3", sender="",
                                         recipients=["gone@example.com"])
        await wait_for(lambda: _all(node, message_id, "failed"), timeout=10)
        assert await store_of(node).message_count() == 1, "no DSN was queued"
    finally:
        await node.stop()


async def test_a_4xx_defers_with_its_evidence(make_settings: Callable[..., Settings],
                                              sink: Sink) -> None:
    sink.faults = Faults(tempfail=1.0, tempfail_reply="451 4.3.0 try again later")
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        message_id = await submit_tagged(node.port, "m4", recipients=["x@example.com"])
        await wait_for(lambda: _all(node, message_id, "deferred"), timeout=10)
        (delivery,) = await store_of(node).deliveries(message_id)
        assert delivery.last_reply_code == 451 and "try again later" in (delivery.last_reply or "")
        assert delivery.attempts == 1
    finally:
        await node.stop()


async def test_a_node_that_only_delivers_is_woken_by_another_nodes_intake(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    """LISTEN/NOTIFY across processes: with a 60 s poll, only the NOTIFY from the intake
    node can get the message delivered within the deadline."""
    intake_only = await start_node(make_settings())
    deliverer = await start_node(delivery_settings(make_settings, sink))
    try:
        await wait_for(lambda: _listening(deliverer), timeout=5)
        message_id = await submit_tagged(intake_only.port, "n1", recipients=["x@example.com"])
        await sink.wait_for_count(1, timeout=5)
        await wait_for(lambda: _all(deliverer, message_id, "delivered"), timeout=5)
    finally:
        await intake_only.stop()
        await deliverer.stop()


async def _listening(node: NodeHandle) -> bool:
    import asyncpg

    conn = await asyncpg.connect(node.settings.database.dsn)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientRead' "
            "AND query LIKE 'LISTEN%'"))
    finally:
        await conn.close()


async def test_an_internal_error_after_the_attempt_started_leaves_the_delivery_uncertain(
    make_settings: Callable[..., Settings], sink: Sink, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug between the dot and the store update: the message may have arrived, so the
    delivery is uncertain (never resent by itself), exactly as a journal replay decides."""
    from mta.journal.records import ReplyReceived

    node = await start_node(delivery_settings(make_settings, sink))
    try:
        deliverer = node.node.deliverer
        assert deliverer is not None
        append_durable = deliverer.journal.append_durable

        async def broken_after_the_reply(record: object) -> None:
            if isinstance(record, ReplyReceived):
                raise RuntimeError("injected bug")
            await append_durable(record)  # type: ignore[arg-type]

        monkeypatch.setattr(deliverer.journal, "append_durable", broken_after_the_reply)
        message_id = await submit_tagged(node.port, "m5", recipients=["u@example.com"])
        await wait_for(lambda: _all(node, message_id, "uncertain"), timeout=10)
        (delivery,) = await store_of(node).deliveries(message_id)
        assert "internal error after the dot was pending" in (delivery.last_reply or "")
        assert [t.recipients for t in sink.transactions if t.received] == [("u@example.com",)]
    finally:
        await node.stop()


async def test_an_internal_error_before_the_attempt_defers_the_delivery(
    make_settings: Callable[..., Settings], sink: Sink, monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        deliverer = node.node.deliverer
        assert deliverer is not None

        async def broken_router(domain: str) -> object:
            raise RuntimeError("injected bug")

        monkeypatch.setattr(deliverer.attempts.router, "next_hop", broken_router)
        message_id = await submit_tagged(node.port, "m6", recipients=["d@example.com"])
        await wait_for(lambda: _all(node, message_id, "deferred"), timeout=10)
        (delivery,) = await store_of(node).deliveries(message_id)
        assert "not sent: internal error" in (delivery.last_reply or "")
        assert sink.transactions == []
    finally:
        await node.stop()


async def test_a_destination_refusing_at_the_greeting_defers_without_a_dsn(
    make_settings: Callable[..., Settings], sink: Sink,
) -> None:
    """A 554 greeting says nothing about the recipients: deferred, as Postfix does with
    ``smtp_skip_5xx_greeting``, with the greeting as evidence."""
    peer = BadPeer(greeting="554 5.7.1 mx.dest.test: no SMTP service for you")
    async with running_bad_peer(peer, "127.0.0.2", sink.port):
        settings = make_settings(delivery={
            "enabled": True, "poll_interval": 60.0, "minimal_backoff": 60.0,
            "routes": [{"domain": "*", "host": "127.0.0.2", "port": sink.port, "tls": "none"}],
        })
        node = await start_node(settings)
        try:
            message_id = await submit_tagged(node.port, "m7", recipients=["g@example.com"])
            await wait_for(lambda: _all(node, message_id, "deferred"), timeout=10)
            (delivery,) = await store_of(node).deliveries(message_id)
            assert delivery.last_reply_code == 554
            assert "no SMTP service for you" in (delivery.last_reply or "")
            assert "before MAIL" in (delivery.last_reply or "")
            assert await store_of(node).message_count() == 1, "no DSN"
        finally:
            await node.stop()


async def test_queue_metrics_show_what_waits_and_for_how_long(
    make_settings: Callable[..., Settings],
) -> None:
    """With delivery off, accepted mail waits: /metrics says how much and since when."""
    node = await start_node(make_settings(database={"queued_bytes_refresh": 0.1}))
    try:
        await submit_tagged(node.port, "m8", recipients=["q1@example.com", "q2@example.com"])

        async def queued() -> bool:
            return await metric(node.admin_port, 'mta_queue_deliveries{state="queued"}') == 2

        assert await metric(node.admin_port, 'mta_queue_deliveries{state="held"}') == 0, \
            "every state is exported from the start"

        await wait_for(queued, timeout=10)
        assert await metric(node.admin_port, 'mta_queue_deliveries{state="uncertain"}') == 0
        await wait_for(lambda: _positive(node, "mta_queue_oldest_message_age_seconds"),
                       timeout=10)
    finally:
        await node.stop()


async def _positive(node: NodeHandle, name: str) -> bool:
    return await metric(node.admin_port, name) > 0


async def test_a_dsn_returns_at_most_64_kib_of_headers_cut_at_a_whole_line(
    make_settings: Callable[..., Settings], sink: Sink
) -> None:
    sink.faults = Faults(reject={"gone@example.com": "550 5.1.1 no such user"})
    node = await start_node(delivery_settings(make_settings, sink))
    try:
        filler = "".join(f"X-Filler-{n:03d}: {'x' * 900}\r\n" for n in range(100))
        client = await RawSMTP.connect(node.port)
        await client.cmd("EHLO client.test")
        reply = await client.submit("app@example.org", ["gone@example.com"], (
            f"Message-ID: <big@test>\r\nSubject: many headers\r\n{filler}\r\nbody\r\n"
        ).encode())
        await client.close()
        assert reply.startswith("250 "), reply
        await wait_for(lambda: _dsn_delivered(sink), timeout=10)
        (dsn,) = [t for t in sink.transactions if t.mail_from == ""]
        returned = dsn.data.split(b"Content-Type: text/rfc822-headers", 1)[1]
        assert b"Subject: many headers" in returned
        assert b"X-Filler-000: " in returned and b"X-Filler-099: " not in returned
        assert len(returned) < 70_000
        fillers = [line for line in returned.split(b"\r\n") if line.startswith(b"X-Filler-")]
        assert fillers and all(len(line) == len("X-Filler-000: ") + 900 for line in fillers)
    finally:
        await node.stop()


@pytest.mark.parametrize(("zone", "status"), [
    ("", "5.1.2"),                                           # NXDOMAIN
    ("gone.example. 300 IN MX 0 .", "5.1.10"),               # null MX (RFC 7505)
])
async def test_a_permanent_dns_answer_fails_with_dns_evidence_never_a_made_up_reply(
    make_settings: Callable[..., Settings], sink: Sink, zone: str, status: str,
) -> None:
    """I2: the store and the DSN say what DNS said; no SMTP server sent a 550."""
    async with loopback_dns() as dns:
        dns.set_zone(zone)
        node = await start_node(make_settings(delivery={
            "enabled": True, "poll_interval": 60.0, "nameservers": ["127.0.0.1"],
            "dns_port": dns.port, "dns_timeout": 2.0,
            "routes": [{"domain": "example.org", "host": "127.0.0.1", "port": sink.port,
                        "tls": "none"}],
        }))
        try:
            message_id = await submit_tagged(node.port, "dns1", recipients=["u@gone.example"])
            await wait_for(lambda: _all(node, message_id, "failed"), timeout=10)
            (delivery,) = await store_of(node).deliveries(message_id)
            assert delivery.last_reply_code is None
            assert (delivery.last_reply or "").startswith("DNS: "), delivery.last_reply
            await wait_for(lambda: _dsn_delivered(sink), timeout=10)
            (bounce,) = [t for t in sink.transactions if t.mail_from == ""]
            text = bounce.data.decode()
            assert "Diagnostic-Code: X-DNS; " in text and "smtp; 550" not in text
            assert f"Status: {status}" in text and "Remote-MTA" not in text
        finally:
            await node.stop()
