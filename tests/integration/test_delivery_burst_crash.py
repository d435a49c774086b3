"""I3 under load: 2,000 deliveries in flight, the node SIGKILLed at each named point of
the delivery path and at a random moment, restarted, and checked against the sink."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from mta.config import Settings
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from tests.support.delivery import last_replies, states_by_id, states_by_recipient
from tests.support.journal import pending
from tests.support.nodes import wait_for
from tests.support.pg import DATABASE, own_postgres
from tests.support.process import NodeProcess
from tests.support.sink import Sink

DELIVERIES = 2000
#: SIGKILLs in quick succession in the breaker's drill.
KILLS = 7
SIGKILL_STATUS = -9
FINAL = ("delivered", "uncertain")


async def preload(db_dsn: str, settings: Settings, deliveries: int = DELIVERIES) -> None:
    store = await Store.open(db_dsn, settings)
    try:
        for n in range(deliveries):
            await store.enqueue(NewMessage(
                id=new_message_id(), mail_from="app@example.org",
                recipients=[f"r{n}@example.com"], trace_headers=b"",
                body=f"Message-ID: <b{n}@test>\r\n\r\nbody {n}\r\n".encode(),
                client_address="127.0.0.1", helo_name="h", auth_user=None,
                message_id_header=f"<b{n}@test>"))
    finally:
        await store.close()


def node_for(tmp_path: Path, db_dsn: str, sink: Sink) -> NodeProcess:
    return NodeProcess.configure(tmp_path / "node", db_dsn, node={"workers": 8}, delivery={
        "enabled": True, "poll_interval": 0.5, "batch_size": 50,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })


def check_invariants(sink: Sink, final: dict[str, str], in_flight_at_kill: int) -> None:
    """Nothing lost; every duplicate and every unrecorded arrival is uncertain."""
    assert len(final) == DELIVERIES
    assert set(final.values()) <= set(FINAL), Counter(final.values())
    received = Counter()
    for transaction in sink.transactions:
        if transaction.received:
            for rcpt in transaction.recipients:
                received[rcpt.lower()] += 1
    for rcpt, state in final.items():
        count = received[rcpt]
        if count > 1:
            assert state == "uncertain", f"{rcpt} arrived {count} times but is {state}"
        if state == "delivered":
            assert count == 1, f"{rcpt} is delivered but arrived {count} times"
        elif count:
            assert state == "uncertain", (rcpt, state)
    uncertain = sum(1 for state in final.values() if state == "uncertain")
    assert uncertain <= in_flight_at_kill, (uncertain, in_flight_at_kill)


async def crash_and_recover(tmp_path: Path, db_dsn: str, sink: Sink,
                            make_settings: Callable[..., Settings],
                            kill_after: int | None, env: dict[str, str]) -> None:
    """Preload, run until killed (by the fault hook in ``env`` or by the test once the
    sink has ``kill_after`` transactions), restart, settle, check the invariants: and
    the deliveries left uncertain are exactly those whose dot-pending record the dead
    process's journal holds without a reply (I3: before the dot, certainly not sent)."""
    await preload(db_dsn, make_settings())
    node = node_for(tmp_path, db_dsn, sink)
    node.env = env
    await node.start()
    try:
        if kill_after is not None:
            await wait_for(lambda: len(sink.transactions) >= kill_after, timeout=60)
            node.signal(signal.SIGKILL)
        assert await node.wait_exit(60) == SIGKILL_STATUS
        at_kill = await states_by_recipient(db_dsn)
        in_flight = sum(1 for state in at_kill.values() if state == "leased")
        assert in_flight > 0, "deliveries were in flight at the kill"
        assert sum(1 for s in at_kill.values() if s in ("queued", "leased")) > 0
        dot_pending = {delivery for attempt in pending(tmp_path / "node" / "data" / "journal")
                       .unanswered for delivery in attempt.missing}
        node.env = {}
        await node.start()

        async def settled() -> bool:
            return all(state in FINAL for state in (await states_by_recipient(db_dsn)).values())

        await wait_for(settled, timeout=120)
        check_invariants(sink, await states_by_recipient(db_dsn), in_flight)
        uncertain = {delivery for delivery, state in (await states_by_id(db_dsn)).items()
                     if state == "uncertain"}
        assert uncertain == dot_pending
    finally:
        await node.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "delivery.during_data", "delivery.after_dot_pending", "delivery.after_dot",
    "delivery.after_reply_journaled",
])
async def test_sigkill_at_a_named_point_mid_burst(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
    point: str,
) -> None:
    await crash_and_recover(tmp_path, db_dsn, sink, make_settings, None, {
        "MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": point, "MTA_FAULT_KILL_AFTER": "400",
    })


@pytest.mark.slow
async def test_a_journal_lost_with_its_node_makes_every_lease_it_held_uncertain(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """I3, missing evidence: the node is killed mid-burst and its journal directory
    deleted (a wiped or replaced disk). Without the journal nothing proves a lease's
    dot was never written, so every lease the dead process held is uncertain, and
    nothing is resent blindly."""
    await preload(db_dsn, make_settings())
    node = node_for(tmp_path, db_dsn, sink)
    await node.start()
    try:
        await wait_for(lambda: len(sink.transactions) >= 300, timeout=60)
        node.signal(signal.SIGKILL)
        assert await node.wait_exit(60) == SIGKILL_STATUS
        leased = {delivery for delivery, state in (await states_by_id(db_dsn)).items()
                  if state == "leased"}
        assert leased, "deliveries were in flight at the kill"
        shutil.rmtree(tmp_path / "node" / "data" / "journal")
        await node.start()

        async def settled() -> bool:
            return all(state in FINAL for state in (await states_by_recipient(db_dsn)).values())

        await wait_for(settled, timeout=120)
        uncertain = await last_replies(db_dsn, "uncertain")
        assert set(uncertain) == leased
        assert all(reply.startswith("journal missing: ") for reply in uncertain.values()), \
            set(uncertain.values())
        check_invariants(sink, await states_by_recipient(db_dsn), len(leased))
    finally:
        await node.close()


@pytest.mark.slow
async def test_sigkill_at_a_random_moment_mid_burst(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    moment = random.Random().randrange(300, 1500)
    await crash_and_recover(tmp_path, db_dsn, sink, make_settings, moment, {})


@pytest.mark.slow
async def test_postgres_killed_mid_burst_recovers_without_loss_or_duplicates(
    tmp_path: Path, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """SIGKILL the store's server during a burst and start it again: the node carries on
    by itself; replies that arrived meanwhile are applied from memory and the journal."""
    async with own_postgres(tmp_path / "pg") as server:
        dsn = server.dsn_for(DATABASE)
        await preload(dsn, make_settings())
        node = NodeProcess.configure(tmp_path / "node", dsn, node={"workers": 8}, delivery={
            "enabled": True, "poll_interval": 0.5, "batch_size": 50,
            "minimal_backoff": 0.5, "maximal_backoff": 1.0,
            "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
        })
        await node.start()
        try:
            await wait_for(lambda: len(sink.transactions) >= 400, timeout=60)
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)

            async def settled() -> bool:
                try:
                    found = await states_by_recipient(dsn)
                except (OSError, asyncpg.PostgresError):
                    return False
                return len(found) == DELIVERIES and all(s == "delivered" for s in found.values())

            await wait_for(settled, timeout=120)
            assert node.process is not None and node.process.poll() is None
            conn = await asyncpg.connect(dsn)
            try:
                not_done = await conn.fetchval(
                    "SELECT count(*) FROM messages WHERE done_at IS NULL")
            finally:
                await conn.close()
            assert not_done == 0, "every message is marked done, so retention will purge it"
            assert node.events(), "every line logged while the store was down is JSON"
        finally:
            await node.close()
    received = Counter(rcpt.lower() for t in sink.transactions if t.received
                       for rcpt in t.recipients)
    assert len(received) == DELIVERIES
    assert max(received.values()) == 1, "no message was sent twice"


@pytest.mark.slow
async def test_kills_from_outside_hold_only_what_was_alone_in_flight_at_the_last_death(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """The crash-loop breaker narrows (DESIGN.md): SIGKILLs from outside in quick
    succession during a burst. From what was in flight at each kill, and what the
    journal proves, the test works out which deliveries were alone in flight at their
    ``crash_loop_limit``-th death; exactly those are held (normally none), and nothing
    else."""
    limit = 3
    journal = tmp_path / "node" / "data" / "journal"
    # Fewer than a start leases at once: what a death leaves is in flight again at the
    # next one, so deaths pile up on the same deliveries.
    await preload(db_dsn, make_settings(), deliveries=150)
    node = node_for(tmp_path, db_dsn, sink)
    deaths: Counter[int] = Counter()
    expected_held: set[int] = set()
    await node.start()
    try:
        for kill in range(KILLS):
            target = len(sink.transactions) + 1
            await wait_for(lambda n=target: len(sink.transactions) >= n, timeout=60)
            node.signal(signal.SIGKILL)
            assert await node.wait_exit(60) == SIGKILL_STATUS
            leased = {d for d, s in (await states_by_id(db_dsn)).items() if s == "leased"}
            assert leased or kill > 0, "deliveries were in flight at the first kill"
            proven = {d for attempt in [*pending(journal).replied, *pending(journal).unanswered]
                      for d in attempt.dot.delivery_ids}
            released = leased - proven  # what recovery requeues as certainly not sent
            for delivery in released:
                deaths[delivery] += 1
                if len(released) == 1 and deaths[delivery] >= limit:
                    expected_held.add(delivery)
            await node.start()

        async def settled() -> bool:
            return all(s in (*FINAL, "held") for s in (await states_by_id(db_dsn)).values())

        await wait_for(settled, timeout=120)
        final = await states_by_id(db_dsn)
        assert {d for d, s in final.items() if s == "held"} == expected_held
        # The scenario, not the verdict: deaths piled up on the same deliveries (how many
        # reach the limit depends on where each kill lands).
        assert max(deaths.values()) >= 2, "deliveries were in flight at several deaths"
    finally:
        await node.close()
