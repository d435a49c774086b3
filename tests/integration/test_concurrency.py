"""Many sessions at once: every message stored exactly once, nothing more, nothing less."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from mta.config import Settings
from mta.queue.ids import parse_queue_id
from tests.support.mail import Ledger, stored_message_ids, submit_loop
from tests.support.nodes import start_node

SESSIONS = 200
PER_SESSION = 10


async def test_two_hundred_sessions_of_ten_messages_store_each_message_once(
    make_settings: Callable[..., Settings], db_dsn: str
) -> None:
    """200 concurrent sessions x 10 messages: 2,000 distinct Message-IDs, each stored once."""
    settings = make_settings(
        node={"intake_db_slots": 32},
        smtp={"max_sessions": SESSIONS + 10, "max_sessions_per_client": SESSIONS + 10,
              "data_concurrency": SESSIONS},
        database={"acquire_timeout": 10.0, "commit_timeout": 10.0},
    )
    handle = await start_node(settings)
    ledger = Ledger()
    try:
        await asyncio.wait_for(asyncio.gather(*(
            submit_loop(handle.port, n, ledger, PER_SESSION, tag="c")
            for n in range(SESSIONS)
        )), 120)
    finally:
        await handle.stop()

    sent = {f"<c-{n}-{i}@test.invalid>" for n in range(SESSIONS) for i in range(PER_SESSION)}
    assert not ledger.refused, dict(list(ledger.refused.items())[:5])
    assert set(ledger.accepted) == sent
    stored = await stored_message_ids(db_dsn)
    assert len(stored) == SESSIONS * PER_SESSION
    headers = Counter(header for _, header in stored)
    assert set(headers) == sent
    assert max(headers.values()) == 1
    assert {uid for uid, _ in stored} == {parse_queue_id(q) for q in ledger.accepted.values()}
