"""I3b: a record the store cannot apply is set aside, raw, never retried in a loop: its
deliveries become uncertain, it is counted and listed, and nothing else waits for it."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from mta.config import Settings
from mta.errors import StoreRejected
from mta.journal.records import DotPending, ReplyReceived
from mta.journal.writer import Journal
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from mta.queue.outcome_batch import OutcomeBatcher
from mta.queue.records import AttemptOutcome, SetAside
from tests.support.admin import metric
from tests.support.delivery import submit_tagged
from tests.support.process import NodeProcess, run_mta
from tests.support.sink import Sink

#: The lease owner of a dead process of the node ``proc-node`` (tests/support/process.py).
DEAD_OWNER = "proc_node-1-1"


async def leased_delivery(store: Store, owner: str) -> tuple[uuid.UUID, int]:
    """A message with one delivery, leased to ``owner``; its message id and delivery id."""
    message_id = new_message_id()
    await store.enqueue(NewMessage(
        id=message_id, mail_from="app@example.org", recipients=["user@example.com"],
        trace_headers=b"", body=b"Message-ID: <odd@test>\r\n\r\nbody\r\n",
        client_address="127.0.0.1", helo_name="h", auth_user=None,
        message_id_header="<odd@test>"))
    (claimed,) = await store.claim_due(owner, 10, 600.0)
    return message_id, claimed.id


async def test_a_journal_record_that_cannot_be_applied_is_set_aside_and_the_node_starts(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """A dead process's journal holds a reply no SMTP server sends (code 99999): replay
    sets it aside instead of stopping start-up, and mail flows."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })
    store = await Store.open(db_dsn, make_settings())
    try:
        message_id, delivery_id = await leased_delivery(store, DEAD_OWNER)
        journal = Journal.open(tmp_path / "node" / "data" / "journal", DEAD_OWNER)
        await journal.append_durable(DotPending("a1", (delivery_id,), str(message_id),
                                                    "mx.example", time.time()))
        await journal.append_durable(ReplyReceived("a1", delivery_id, 99999,
                                                   "no such reply", True, time.time()))
        await journal.close()

        await node.start()
        try:
            (delivery,) = await store.deliveries(message_id)
            assert delivery.state == "uncertain"
            assert "set aside as #" in (delivery.last_reply or "")
            listed = await run_mta("queue", "set-aside", "--config", str(node.config_path))
            assert listed.returncode == 0, listed.stderr
            assert "1 set aside" in listed.stdout
            assert "replay" in listed.stdout and DEAD_OWNER in listed.stdout
            assert "no such reply" in listed.stdout and "99999" in listed.stdout
            assert await metric(node.admin_port,
                                re.escape('mta_records_set_aside_total{source="replay"}')) == 1
            await submit_tagged(node.smtp_port, "fresh")
            await sink.wait_for_count(1, timeout=10)
            assert sink.count("fresh@test", "user@example.com") == 1
        finally:
            await node.close()
    finally:
        await store.close()


async def test_an_unreadable_journal_is_set_aside_and_its_leases_become_uncertain(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """A dead process's segment is corrupt in the middle (not a torn last line): the
    node starts, keeps the bytes, and its leases are uncertain (missing evidence)."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })
    journal_dir = tmp_path / "node" / "data" / "journal"
    store = await Store.open(db_dsn, make_settings())
    try:
        message_id, delivery_id = await leased_delivery(store, DEAD_OWNER)
        journal = Journal.open(journal_dir, DEAD_OWNER)
        await journal.append_durable(DotPending("a1", (delivery_id,), str(message_id),
                                                "mx.example", time.time()))
        await journal.append_durable(ReplyReceived("a1", delivery_id, 250, "ok", True,
                                                   time.time()))
        await journal.close()
        (segment,) = journal_dir.glob(f"{DEAD_OWNER}.*.jrnl")
        data = bytearray(segment.read_bytes())
        data[20] ^= 0x01  # the first line's checksum no longer matches
        segment.write_bytes(bytes(data))

        await node.start()
        try:
            (delivery,) = await store.deliveries(message_id)
            assert delivery.state == "uncertain"
            (kept,) = await store.set_aside_records()
            assert kept.reason.startswith("journal unreadable: ")
            assert kept.delivery_ids == [delivery_id] and kept.raw == bytes(data)
            assert (journal_dir / "unreadable" / segment.name).read_bytes() == bytes(data)
            assert not segment.exists()
            await submit_tagged(node.smtp_port, "fresh")
            await sink.wait_for_count(1, timeout=10)
        finally:
            await node.close()
    finally:
        await store.close()


async def test_refused_outcomes_fail_only_their_own_writer_in_a_shared_batch(
    db_dsn: str, make_settings: Callable[..., Settings],
) -> None:
    """Two writers share a statement; the store refuses one's text (NUL): the other's
    outcome is committed, and only the first learns StoreRejected."""
    store = await Store.open(db_dsn, make_settings())
    try:
        good_message, good = await leased_delivery(store, "owner")
        bad_message, bad = await leased_delivery(store, "owner")
        batcher = OutcomeBatcher(store, "owner")
        results = await asyncio.gather(
            batcher.write([AttemptOutcome(good, "delivered", 250, "250 ok")]),
            batcher.write([AttemptOutcome(bad, "failed", 550, "550 no\x00such user")]),
            return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], StoreRejected)
        states = {d.id: d.state for m in (good_message, bad_message)
                  for d in await store.deliveries(m)}
        assert states == {good: "delivered", bad: "leased"}
        record_id = await store.set_aside(SetAside(
            source="settlement", owner="owner", attempt_id="a2", delivery_ids=(bad,),
            reason="refused", raw=b'{"reply": "550 no\\u0000such user"}'))
        (kept,) = await store.set_aside_records()
        assert (kept.id, kept.delivery_ids, kept.raw) == (
            record_id, [bad], b'{"reply": "550 no\\u0000such user"}')
        states = {d.id: d.state for m in (good_message, bad_message)
                  for d in await store.deliveries(m)}
        assert states == {good: "delivered", bad: "uncertain"}
    finally:
        await store.close()
