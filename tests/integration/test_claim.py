"""Claiming due work: an index walk whose cost does not grow with the queue (I5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import new_message_id
from mta.queue.sql import query

MESSAGES = 1_000
PER_MESSAGE = 1_000


def _message_rows(ids: list[uuid.UUID]) -> Iterator[tuple[Any, ...]]:
    for message_id in ids:
        yield (message_id, "sender@example.org", 10, b"", b"body", "127.0.0.1", "h", None, None)


def _delivery_rows(ids: list[uuid.UUID], now: datetime,
                   queued_percent: int) -> Iterator[tuple[Any, ...]]:
    for n, message_id in enumerate(ids):
        for i in range(PER_MESSAGE):
            due = now - timedelta(seconds=(n * PER_MESSAGE + i) % 86_400)
            state = "queued" if i % 100 < queued_percent else "delivered"
            yield (message_id, f"r{i}@d{i % 97}.example", f"d{i % 97}.example", state, due)


async def load_deliveries(dsn: str, messages: int = MESSAGES, queued_percent: int = 75) -> None:
    """COPY ``messages`` x 1,000 deliveries, ``queued_percent`` of them queued, the rest
    already delivered."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = [new_message_id() for _ in range(messages)]
        await conn.copy_records_to_table(
            "messages", records=_message_rows(ids),
            columns=["id", "mail_from", "size_bytes", "trace_headers", "body",
                     "client_address", "helo_name", "auth_user", "message_id_header"],
        )
        await conn.copy_records_to_table(
            "deliveries", records=_delivery_rows(ids, datetime.now(UTC), queued_percent),
            columns=["message_id", "recipient", "next_hop", "state", "next_attempt_at"],
        )
        await conn.execute("ANALYZE deliveries")
    finally:
        await conn.close()


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def test_queue_stats_walk_the_partial_indexes_when_most_mail_is_done(
    db_dsn: str, make_settings: Any,
) -> None:
    """The stats run every few seconds: they must not scan the delivered history."""
    await load_deliveries(db_dsn, messages=200, queued_percent=1)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("ANALYZE messages")
        raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query("queue_stats"))
    finally:
        await conn.close()
    nodes = list(plan_nodes(json.loads(raw)[0]["Plan"]))
    scanned = [(n["Node Type"], n.get("Relation Name")) for n in nodes if "Scan" in n["Node Type"]]
    assert ("Seq Scan", "deliveries") not in scanned, scanned
    store = await Store.open(db_dsn, make_settings())
    try:
        stats = await store.queue_stats()
    finally:
        await store.close()
    assert stats.by_state == {"queued": 2_000, "deferred": 0, "leased": 0, "uncertain": 0,
                              "held": 0}
    assert stats.due_lag_s > 0 and stats.oldest_message_s >= 0
    assert stats.expired_leases == 0


async def _claim_plan(conn: asyncpg.Connection, setting: str) -> list[dict[str, Any]]:
    async with conn.transaction():
        if setting:
            await conn.execute(f"SET LOCAL {setting}")
        raw = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + query("delivery_claim_due"), "owner", 50, 30.0,
            ["d1.example", "d2.example"], [0, 3],
        )
    return list(plan_nodes(json.loads(raw)[0]["Plan"]))


@pytest.mark.slow
async def test_claim_plan_uses_the_due_index_at_a_million_rows(db_dsn: str) -> None:
    """Whatever the statistics, the claim walks the due index and probes each claimed
    message's siblings by index. Turning nested loops off stands in for a planner whose
    estimates favour a hash join (which once read all million rows on a CI machine)."""
    await load_deliveries(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        count = await conn.fetchval("SELECT count(*) FROM deliveries")
        assert count == MESSAGES * PER_MESSAGE
        plans = {setting: await _claim_plan(conn, setting)
                 for setting in ("", "enable_nestloop = off")}
    finally:
        await conn.close()
    for setting, nodes in plans.items():
        kinds = [node["Node Type"] for node in nodes]
        scanned = [(node["Node Type"], node.get("Relation Name")) for node in nodes]
        # The 1,000-row messages table may be read whole for the envelopes; the million
        # deliveries never are.
        assert ("Seq Scan", "deliveries") not in scanned, (setting, scanned)
        # The only sort allowed is of the claimed candidates (at most the claim's limit,
        # to share out each next hop's room): never of the deliveries table itself.
        sorts = [node for node in nodes if node["Node Type"] in ("Sort", "Incremental Sort")]
        for sort in sorts:
            below = {child.get("Relation Name") for child in plan_nodes(sort)}
            assert "deliveries" not in below, (setting, sort)
        index_uses = [node.get("Index Name") for node in nodes
                      if node["Node Type"] in ("Index Scan", "Index Only Scan",
                                               "Bitmap Index Scan")]
        assert {"deliveries_due", "deliveries_message"} <= set(index_uses), (setting, nodes)
        # The due index serves the walk for the first rows only, never the siblings.
        assert index_uses.count("deliveries_due") == 1, (setting, index_uses)
        assert "LockRows" in kinds, "the claim must lock what it takes (FOR UPDATE SKIP LOCKED)"


async def test_claim_siblings_probe_by_message_with_stale_statistics(db_dsn: str) -> None:
    """Statistics from when nothing was due (a quiet spell), then a burst: the siblings
    are still found by message, not by walking the due index once per claimed row."""
    await load_deliveries(db_dsn, messages=20, queued_percent=0)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("UPDATE deliveries SET state = 'queued'")
        nodes = await _claim_plan(conn, "")
    finally:
        await conn.close()
    index_uses = [node.get("Index Name") for node in nodes
                  if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")]
    assert index_uses.count("deliveries_due") == 1, index_uses
    assert "deliveries_message" in index_uses, index_uses


@pytest.mark.parametrize("statement", ["delivery_record_outcomes", "delivery_renew_leases",
                                       "delivery_give_back"])
async def test_lease_holder_statements_probe_the_primary_key(
    db_dsn: str, statement: str,
) -> None:
    """Outcomes, renewals and give-backs name their deliveries by id: the plan probes the
    primary key, not the partial index of leases (whose dead entries pile up between
    vacuums, since no lease change is a HOT update)."""
    await load_deliveries(db_dsn, messages=20)
    conn = await asyncpg.connect(db_dsn)
    try:
        # Statistics from before the leases, as after a quiet spell: few leased rows.
        await conn.execute("ANALYZE deliveries")
        await conn.execute("UPDATE deliveries SET state = 'leased', lease_owner = 'owner', "
                           "lease_expires_at = now() + interval '1 minute' WHERE id % 7 = 0")
        ids = [7, 14, 21, 28, 35]
        args: tuple[Any, ...] = {
            "delivery_record_outcomes": ("owner", ids, ["delivered"] * 5, [250] * 5,
                                         ["2.0.0 ok"] * 5, [0.0] * 5, [False] * 5,
                                         ["mx.test"] * 5, [None] * 5, [None] * 5,
                                         [None] * 5),
            "delivery_renew_leases": ("owner", ids, 30.0),
            "delivery_give_back": ("owner", ids),
        }[statement]
        raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query(statement), *args)
    finally:
        await conn.close()
    nodes = list(plan_nodes(json.loads(raw)[0]["Plan"]))
    on_deliveries = [node.get("Index Name") for node in nodes
                     if (node.get("Relation Name") == "deliveries" and "Index Name" in node)
                     or node["Node Type"] == "Bitmap Index Scan"]
    assert "deliveries_lease_expiry" not in on_deliveries, on_deliveries
    assert "deliveries_pkey" in on_deliveries, on_deliveries
    assert ("Seq Scan", "deliveries") not in [(n["Node Type"], n.get("Relation Name"))
                                              for n in nodes]


async def test_concurrent_claims_never_share_a_delivery(
    db_dsn: str, make_settings: Any
) -> None:
    settings: Settings = make_settings()
    store = await Store.open(db_dsn, settings)
    try:
        from mta.queue import NewMessage

        for n in range(40):
            await store.enqueue(NewMessage(
                id=new_message_id(), mail_from="a@example.org",
                recipients=[f"r{n}-{i}@example.com" for i in range(5)], trace_headers=b"",
                body=b"x\r\n", client_address="127.0.0.1", helo_name="h", auth_user=None,
                message_id_header=None,
            ))
        batches = await asyncio.gather(*(
            store.claim_due(f"worker-{i}", 30, 60.0) for i in range(8)
        ))
    finally:
        await store.close()
    claimed = [delivery.id for batch in batches for delivery in batch]
    assert len(claimed) == len(set(claimed)) == 200
