"""Delivery state transitions in the store: guarded by state and lease owner, each with
its evidence event, and safe to apply twice (journal replay)."""

from __future__ import annotations

from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from mta.queue.records import AttemptOutcome


async def enqueue(store: Store, recipients: int) -> None:
    await store.enqueue(NewMessage(
        id=new_message_id(), mail_from="a@example.org",
        recipients=[f"r{i}@example.com" for i in range(recipients)], trace_headers=b"",
        body=b"x\r\n", client_address="127.0.0.1", helo_name="h", auth_user=None,
        message_id_header=None,
    ))


async def test_outcomes_apply_with_evidence_and_only_once(store: Store) -> None:
    await enqueue(store, 4)
    claimed = await store.claim_due("worker-a", 10, 60.0)
    ids = [delivery.id for delivery in claimed]
    outcomes = [
        AttemptOutcome(ids[0], "delivered", 250, "250 2.0.0 Ok: queued as X"),
        AttemptOutcome(ids[1], "deferred", 451, "451 4.3.0 try later", retry_in_s=300),
        AttemptOutcome(ids[2], "failed", 550, "550 5.1.1 no such user"),
        AttemptOutcome(ids[3], "uncertain", None, "timeout waiting for the reply to the dot"),
    ]
    assert await store.record_outcomes("worker-a", outcomes) == set(ids)
    assert await store.record_outcomes("worker-a", outcomes) == set(), "a replay changes nothing"

    message_id = claimed[0].message_id
    by_id = {d.id: d for d in await store.deliveries(message_id)}
    assert [by_id[i].state for i in ids] == ["delivered", "deferred", "failed", "uncertain"]
    assert by_id[ids[0]].last_reply == "250 2.0.0 Ok: queued as X"
    assert by_id[ids[2]].last_reply_code == 550
    assert all(by_id[i].lease_owner is None and by_id[i].attempts == 1 for i in ids)
    assert by_id[ids[1]].next_attempt_at > by_id[ids[0]].next_attempt_at
    events = await store.delivery_events(ids[2])
    assert [(e.state, e.reply_code, e.detail, e.actor) for e in events] == [
        ("failed", 550, "550 5.1.1 no such user", "worker-a")
    ]


async def test_an_outcome_from_a_process_that_lost_the_lease_is_refused(store: Store) -> None:
    await enqueue(store, 1)
    (delivery,) = await store.claim_due("worker-a", 1, 60.0)
    late = AttemptOutcome(delivery.id, "delivered", 250, "250 ok")
    assert await store.record_outcomes("worker-b", [late]) == set()
    assert await store.renew_leases("worker-b", [delivery.id], 60.0) == set()
    assert await store.renew_leases("worker-a", [delivery.id], 60.0) == {delivery.id}
    assert await store.record_outcomes("worker-a", [late]) == {delivery.id}


async def test_unsent_leases_return_to_the_queue_and_are_claimed_again(store: Store) -> None:
    await enqueue(store, 2)
    claimed = await store.claim_due("dead-worker", 10, 60.0)
    ids = {delivery.id for delivery in claimed}
    assert await store.claim_due("worker-b", 10, 60.0) == []
    reason = "no attempt journaled: certainly not sent"
    assert await store.release_unsent("dead-worker", list(ids), reason) == ids
    again = await store.claim_due("worker-b", 10, 60.0)
    assert {delivery.id for delivery in again} == ids
    events = await store.delivery_events(next(iter(ids)))
    assert events[-1].detail == reason and events[-1].state == "queued"


async def test_operators_resolve_uncertain_deliveries_with_an_audit_trail(store: Store) -> None:
    await enqueue(store, 2)
    first, second = await store.claim_due("worker-a", 10, 60.0)
    await store.record_outcomes("worker-a", [
        AttemptOutcome(first.id, "uncertain", None, "connection lost after the dot"),
        AttemptOutcome(second.id, "uncertain", None, "connection lost after the dot"),
    ])
    listed = await store.deliveries_in_state("uncertain")
    assert {entry.id for entry in listed} == {first.id, second.id}
    assert all(entry.mail_from == "a@example.org" for entry in listed)

    assert await store.resend_uncertain([first.id], "alice", "remote confirmed loss") == {
        first.id}
    assert await store.mark_uncertain_delivered([second.id], "bob", "seen in inbox") == {
        second.id}
    assert await store.resend_uncertain([second.id], "alice", "again") == set(), \
        "only uncertain deliveries can be resent"

    by_id = {d.id: d for d in await store.deliveries(first.message_id)}
    assert by_id[first.id].state == "queued" and by_id[first.id].possible_duplicate
    assert by_id[second.id].state == "delivered" and not by_id[second.id].possible_duplicate
    trail = await store.delivery_events(second.id)
    assert (trail[-1].state, trail[-1].actor, trail[-1].detail) == (
        "delivered", "bob", "seen in inbox")


async def test_held_deliveries_are_never_claimed_until_released(store: Store) -> None:
    await enqueue(store, 3)
    claimed = await store.claim_due("worker-a", 1, 60.0)
    assert len(claimed) == 3, "a message's recipients at one destination come together"
    await store.record_outcomes("worker-a", [
        AttemptOutcome(d.id, "deferred", 421, "421 busy", retry_in_s=0) for d in claimed
    ])
    message_id = claimed[0].message_id
    ids = [d.id for d in await store.deliveries(message_id)]
    assert await store.hold(ids, "carol", "crash-loop") == set(ids)
    assert await store.claim_due("worker-a", 10, 60.0) == []
    held = await store.deliveries_in_state("held")
    assert {entry.hold_reason for entry in held} == {"crash-loop"}
    assert await store.release_held(ids, "carol", "fixed") == set(ids)
    assert len(await store.claim_due("worker-a", 10, 60.0)) == 3


async def test_finished_messages_are_done_then_purged_bodies_first(store: Store) -> None:
    from mta.queue.retention import Retention

    await enqueue(store, 2)
    first, second = await store.claim_due("worker-a", 10, 60.0)
    queued_before = await store.queued_bytes()
    await store.record_outcomes("worker-a", [
        AttemptOutcome(first.id, "delivered", 250, "250 ok"),
        AttemptOutcome(second.id, "deferred", 451, "451 later", retry_in_s=0),
    ])
    message = await store.message(first.message_id)
    assert message is not None and message.done_at is None, "one delivery is not final yet"
    (again,) = await store.claim_due("worker-a", 10, 60.0)
    await store.record_outcomes("worker-a", [AttemptOutcome(again.id, "failed", 550, "550 no")])
    message = await store.message(first.message_id)
    assert message is not None and message.done_at is not None
    assert await store.queued_bytes() == queued_before - message.size_bytes

    keep_bodies = Retention(store, body_after_s=3600, metadata_after_s=7200,
                            audit_after_s=7200, batch=1, interval_s=60)
    assert (await keep_bodies.run_once()).bodies == 0, "not old enough"
    purge_now = Retention(store, body_after_s=0, metadata_after_s=3600, audit_after_s=3600,
                          batch=1, interval_s=60)
    counts = await purge_now.run_once()
    assert (counts.bodies, counts.messages) == (1, 0)
    assert await store.message_content(first.message_id) == (b"", b"")
    assert await store.message(first.message_id) is not None, "metadata stays longer"
    purge_all = Retention(store, body_after_s=0, metadata_after_s=0, audit_after_s=3600,
                          batch=1, interval_s=60)
    assert (await purge_all.run_once()).messages == 1
    assert await store.message(first.message_id) is None
    assert await store.deliveries(first.message_id) == []


async def test_repeating_outcomes_whose_first_write_landed_still_marks_the_message_done(
    store: Store, db_dsn: str,
) -> None:
    """The outcome write can commit and the store fail before the message is marked done;
    the held-back repeat applies nothing new but must still finish the message."""
    import asyncpg

    await enqueue(store, 1)
    (delivery,) = await store.claim_due("worker-a", 1, 60.0)
    outcome = AttemptOutcome(delivery.id, "delivered", 250, "250 ok")
    assert await store.record_outcomes("worker-a", [outcome]) == {delivery.id}
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("UPDATE messages SET done_at = NULL WHERE id = $1",
                           delivery.message_id)
    finally:
        await conn.close()
    assert await store.record_outcomes("worker-a", [outcome]) == set()
    message = await store.message(delivery.message_id)
    assert message is not None and message.done_at is not None


async def test_a_failure_and_its_dsn_commit_together_and_only_once(store: Store) -> None:
    await enqueue(store, 2)
    failing, delivering = await store.claim_due("worker-a", 10, 60.0)
    dsn = NewMessage(id=new_message_id(), mail_from="", recipients=["a@example.org"],
                     trace_headers=b"", body=b"DSN\r\n", client_address="127.0.0.1",
                     helo_name="h", auth_user=None, message_id_header=None)
    outcomes = [AttemptOutcome(failing.id, "failed", 550, "550 5.1.1 no such user"),
                AttemptOutcome(delivering.id, "delivered", 250, "250 ok")]
    assert await store.record_outcomes("worker-a", outcomes, bounce=dsn) == {
        failing.id, delivering.id}
    assert await store.message_count() == 2
    again = NewMessage(**{**dsn.__dict__, "id": new_message_id()})
    assert await store.record_outcomes("worker-a", outcomes, bounce=again) == set()
    assert await store.message_count() == 2, "a repeat queues no second DSN"
    assert [d.recipient for d in await store.deliveries(dsn.id)] == ["a@example.org"]


async def test_a_dsn_is_not_queued_for_a_failure_this_owner_cannot_record(store: Store) -> None:
    await enqueue(store, 1)
    (delivery,) = await store.claim_due("worker-a", 1, 60.0)
    dsn = NewMessage(id=new_message_id(), mail_from="", recipients=["a@example.org"],
                     trace_headers=b"", body=b"DSN\r\n", client_address="127.0.0.1",
                     helo_name="h", auth_user=None, message_id_header=None)
    late = [AttemptOutcome(delivery.id, "failed", 550, "550 no")]
    assert await store.record_outcomes("worker-b", late, bounce=dsn) == set()
    assert await store.message_count() == 1


async def test_an_expired_lease_of_a_live_owner_is_counted_not_taken_over(
    store: Store,
) -> None:
    """Nothing unlocks a lease by its expiry: it shows in the stats, and its owner's
    outcome still applies (I3: only the journal rules return leases to the queue)."""
    from tests.support.nodes import wait_for

    await enqueue(store, 1)
    (delivery,) = await store.claim_due("slow-worker", 1, 0.05)

    async def expired() -> bool:
        return (await store.queue_stats()).expired_leases == 1

    await wait_for(expired, timeout=5)
    assert await store.claim_due("worker-b", 10, 60.0) == []
    assert (await store.queue_stats()).by_state["leased"] == 1
    outcome = AttemptOutcome(delivery.id, "delivered", 250, "250 ok")
    assert await store.record_outcomes("slow-worker", [outcome]) == {delivery.id}
    assert (await store.queue_stats()).expired_leases == 0


async def test_a_claim_brings_each_messages_due_recipients_at_a_destination_together(
    store: Store,
) -> None:
    await store.enqueue(NewMessage(
        id=new_message_id(), mail_from="a@example.org",
        recipients=[f"r{i}@big.example" for i in range(120)] + ["x@other.example"],
        trace_headers=b"", body=b"x\r\n", client_address="127.0.0.1", helo_name="h",
        auth_user=None, message_id_header=None))
    await enqueue(store, 2)
    first = await store.claim_due("worker-a", 1, 60.0)
    assert {d.next_hop for d in first} == {"big.example"} and len(first) == 120, \
        "the first due row brings its 119 siblings at big.example, not other.example"
    skipping = await store.claim_due("worker-a", 10, 60.0, {"other.example": 0})
    assert {d.next_hop for d in skipping} == {"example.com"} and len(skipping) == 2
    assert [d.next_hop for d in await store.claim_due("worker-a", 10, 60.0)] == [
        "other.example"]


async def test_a_claim_takes_no_more_messages_for_a_next_hop_than_its_room(
    store: Store,
) -> None:
    """Room 2 at big.example: of its five due messages (two recipients each) a claim of
    twelve takes the two oldest with their siblings, and the two at example.com after."""
    big = [new_message_id() for _ in range(5)]
    for message_id in big:
        await store.enqueue(NewMessage(
            id=message_id, mail_from="a@example.org",
            recipients=["x@big.example", "y@big.example"], trace_headers=b"", body=b"x\r\n",
            client_address="127.0.0.1", helo_name="h", auth_user=None,
            message_id_header=None))
    await enqueue(store, 1)
    await enqueue(store, 1)
    claimed = await store.claim_due("worker-a", 12, 60.0, {"big.example": 2})
    at_big = [d for d in claimed if d.next_hop == "big.example"]
    assert {d.message_id for d in at_big} == set(big[:2]) and len(at_big) == 4
    assert len([d for d in claimed if d.next_hop == "example.com"]) == 2
    rest = await store.claim_due("worker-a", 10, 60.0, {"big.example": 5})
    assert {d.message_id for d in rest} == set(big[2:]), "the other three stayed due"


async def test_a_message_finished_by_two_concurrent_outcome_writes_is_still_marked_done(
    store: Store, db_dsn: str,
) -> None:
    """Each write's statement sees the other's delivery as still leased; the write that
    commits second runs the separate mark-done after its commit, which sees both."""
    import asyncpg

    from mta.queue.sql import query

    await store.enqueue(NewMessage(
        id=new_message_id(), mail_from="a@example.org",
        recipients=["x@one.example", "y@two.example"], trace_headers=b"", body=b"x\r\n",
        client_address="127.0.0.1", helo_name="h", auth_user=None, message_id_header=None))
    (first,) = await store.claim_due("owner-a", 1, 60.0, {"two.example": 0})
    (second,) = await store.claim_due("owner-b", 1, 60.0)
    other = await asyncpg.connect(db_dsn)
    try:
        async with other.transaction():
            rows = await other.fetch(query("delivery_record_outcomes"), "owner-b",
                                     [second.id], ["delivered"], [250], ["250 ok"], [0.0],
                                     [False], [None], [None], [None], [None])
            assert [row["message_done"] for row in rows] == [False], "first is still leased"
            await store.record_outcomes("owner-a", [
                AttemptOutcome(first.id, "delivered", 250, "250 ok")])
            message = await store.message(first.message_id)
            assert message is not None and message.done_at is None, "second not committed"
        # owner-b's store call would now run its mark-done; a repeat does the same.
        await store.record_outcomes("owner-b", [
            AttemptOutcome(second.id, "delivered", 250, "250 ok")])
    finally:
        await other.close()
    message = await store.message(first.message_id)
    assert message is not None and message.done_at is not None


async def test_operator_actions_outlive_the_messages_they_name(store: Store) -> None:
    """DESIGN.md, Audit: message retention never cascades into the node's audit trail;
    its records go only after ``retention.audit_after``."""
    from mta.queue.retention import Retention

    await enqueue(store, 1)
    (claimed,) = await store.claim_due("worker-a", 10, 60.0)
    await store.record_outcomes("worker-a", [AttemptOutcome(claimed.id, "uncertain", None,
                                                            "lost reply to the dot")])
    assert await store.mark_uncertain_delivered([claimed.id], "alice", "seen it") == {
        claimed.id}
    assert await store.mark_uncertain_delivered([claimed.id, 999], "bob", "again") == set()
    purge_messages = Retention(store, body_after_s=0, metadata_after_s=0,
                               audit_after_s=3600, batch=10, interval_s=60)
    assert (await purge_messages.run_once()).messages == 1
    assert await store.message(claimed.message_id) is None
    newest, first = await store.audit_records()
    assert (first.operator, first.action, first.reason) == ("alice", "mark-delivered", "seen it")
    assert (first.requested, first.changed, first.node) == ([claimed.id], [claimed.id],
                                                            "test-node")
    assert (newest.operator, newest.requested, newest.changed) == ("bob", [claimed.id, 999], [])
    purge_audit = Retention(store, body_after_s=0, metadata_after_s=0, audit_after_s=0,
                            batch=10, interval_s=60)
    await purge_audit.run_once()
    assert await store.audit_records() == []
