"""Fleet-wide de-duplication of client retries ([dedup]): a repeated submission is
answered 250 with the original queue id and queues nothing again, only unseen
recipients are queued, a message without a Message-ID is never de-duplicated, the check
never blocks intake when the key store is down, and a retry through HAProxy after a node
was killed before its 250 reaches the sink once."""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import queue_id
from tests.support.admin import metric
from tests.support.delivery import submit_tagged
from tests.support.fleet import FleetUnderTest
from tests.support.haproxy import Backend, HAProxy
from tests.support.intake import running_node, store_of
from tests.support.nodes import free_port
from tests.support.sink import Sink, normalize_id
from tests.support.smtp import RawSMTP


async def test_a_repeat_is_answered_with_the_original_id_and_queues_only_new_recipients(
    make_settings: Callable[..., Settings], new_database: Callable[[], str],
) -> None:
    fleet_db = new_database()
    dedup = {"enabled": True, "database": fleet_db}
    # Two nodes (on one store here) share the fleet database's keys.
    async with running_node(make_settings(dedup=dedup)) as node, \
            running_node(make_settings(dedup=dedup, node={"name": "other-node"})) as other:
        first = await submit_tagged(node.port, "m1", recipients=["a@x.example", "b@x.example"])
        again = await submit_tagged(other.port, "m1", recipients=["a@x.example",
                                                                  "b@x.example"])
        assert again == first, "the other node answered with the original queue id"
        assert await store_of(other).message_count() == 1, "and queued nothing"
        widened = await submit_tagged(node.port, "m1", recipients=["b@x.example",
                                                                   "c@x.example"])
        assert widened != first
        assert [d.recipient for d in await store_of(node).deliveries(widened)] == [
            "c@x.example"]
        other_sender = await submit_tagged(node.port, "m1", sender="else@example.org",
                                           recipients=["a@x.example"])
        assert other_sender != first, "the sender is part of the key"
        assert await metric(other.admin_port, "mta_dedup_duplicate_recipients_total") == 2

        for _ in range(2):  # without a Message-ID: never de-duplicated
            client = await RawSMTP.connect(node.port)
            await client.cmd("EHLO client.test")
            reply = await client.submit("app@example.org", ["a@x.example"],
                                        b"Subject: no id\r\n\r\nbody\r\n")
            await client.close()
            assert reply.startswith("250")
        listed = await store_of(node).deliveries_in_state("queued", limit=100)
        assert len({d.message_id for d in listed}) == 5


async def test_with_the_key_store_down_mail_is_accepted_unchecked_and_counted(
    make_settings: Callable[..., Settings],
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/fleet"
    settings = make_settings(dedup={"enabled": True, "database": down, "timeout": 0.5})
    async with running_node(settings) as node:
        first = await submit_tagged(node.port, "d1")
        second = await submit_tagged(node.port, "d1")
        assert first != second
        unchecked = re.escape('mta_dedup_unavailable_total{step="check"}')
        assert await metric(node.admin_port, unchecked) == 2


def submit_from_app(port: int) -> str:
    """The retried message, from the application's address through HAProxy: the DATA
    reply (``SMTPServerDisconnected`` when the node dies before answering)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.5", 0), timeout=10) as smtp:
        smtp.ehlo("app.test")
        smtp.mail("app@example.org")
        smtp.rcpt("user@example.com")
        code, text = smtp.data(b"Message-ID: <retry@test>\r\nSubject: retry\r\n\r\nbody\r\n")
        return f"{code} {text.decode()}"


async def test_a_retry_through_haproxy_after_the_node_died_before_its_250_arrives_once(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(
        tmp_path, new_database, {"a": sink.port, "b": sink.port},
        dedup={"enabled": True, "database": new_database()},
        smtp={"allowed_networks": ["127.0.0.5/32"], "proxy_protocol_from": ["127.0.0.1/32"]})
    a = fleet.nodes["a"]
    a.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": "intake.before_reply"}
    haproxy = HAProxy(tmp_path / "haproxy", [Backend(n, p.smtp_port, p.admin_port)
                                             for n, p in fleet.nodes.items()])
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    other = await Store.open(fleet.dsns["b"], fleet.settings("b"))
    try:
        await fleet.start()
        await haproxy.start()
        assert (await fleet.fleet("drain", "b", "--reason", "only a first")).returncode == 0
        await haproxy.wait_status("b", "DOWN", timeout=15)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.to_thread(submit_from_app, haproxy.port)  # a died after its commit
        assert await a.wait_exit(10) == -signal.SIGKILL
        (committed,) = await store.deliveries_in_state("queued")

        assert (await fleet.fleet("activate", "b", "--reason", "take over")).returncode == 0
        await haproxy.wait_status("a", "DOWN", timeout=15)
        await haproxy.wait_status("b", "UP", timeout=15)
        reply = await asyncio.to_thread(submit_from_app, haproxy.port)  # the app retries
        assert reply.startswith("250") and queue_id(committed.message_id) in reply, reply
        assert await other.message_count() == 0, "b queued nothing"

        a.env = {}
        await a.start()  # a delivers what it committed
        await sink.wait_for_count(1, timeout=30)
        assert [normalize_id(t.message_id or "") for t in sink.transactions] == ["retry@test"]
    finally:
        await haproxy.close()
        await store.close()
        await other.close()
        await fleet.close()
