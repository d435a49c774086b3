"""Fleet-wide de-duplication of client retries (opt-in, ``[dedup]``).

A client whose node died after the commit and before the ``250`` sends the message
again, maybe to another node (RFC 1047). Keys live in the fleet database, shared by every
node: one per (Message-ID, envelope sender, recipient), recorded right after the local
commit and before the ``250``. A retry whose keys are all there is answered ``250`` with
the original queue id and queues nothing; one with some new recipients queues only
those. The check never blocks intake past ``dedup.timeout``: an unreachable key store
means the mail is accepted unchecked (counted). A message without a Message-ID is never
de-duplicated. What is left: a node killed between its commit and the key's write (about
one round trip to the fleet database) leaves no key, so that retry is queued again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import asyncpg

from mta.queue.server import STORE_ERRORS
from mta.queue.sql import parse_queries


@cache
def _queries() -> dict[str, str]:
    text = resources.files("mta.queue").joinpath("dedup.sql").read_text(encoding="utf-8")
    return parse_queries(text)


class DedupUnavailable(Exception):
    """The key store did not answer in time: accept without the check."""


def dedup_key(message_id: str, mail_from: str, recipient: str) -> bytes:
    """The key of one recipient of one message from one sender."""
    normal = message_id.strip().strip("<>")
    return hashlib.sha256(
        f"{normal}\0{mail_from.lower()}\0{recipient.lower()}".encode("utf-8", "replace")
    ).digest()


@dataclass(frozen=True)
class Seen:
    """Which recipients of a submission an earlier one took, and under which queue id."""

    fresh: tuple[str, ...]
    #: The queue id that took them (the first found), None when none was seen.
    original_queue_id: str | None


class DedupStore:
    """One process's small pool on the fleet database for dedup keys."""

    def __init__(self, pool: asyncpg.Pool, node: str, window_s: float,
                 timeout_s: float) -> None:
        self._pool = pool
        self._node = node
        self._window = window_s
        self._timeout = timeout_s
        self._ready = False

    @classmethod
    async def open(cls, dsn: str, node: str, *, connections: int, window_s: float,
                   timeout_s: float) -> DedupStore:
        """A pool of at most ``connections`` (counted in the node's budget, I6). It opens
        lazily, so a fleet database that is down at start costs nothing but counts."""
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=connections,
                                         timeout=timeout_s, command_timeout=timeout_s,
                                         server_settings={
                                             "application_name": f"mta/{node}",
                                             # A key is advice, not mail: one lost in a
                                             # crash of the fleet database only reopens
                                             # the window it closes. No fsync per key.
                                             "synchronous_commit": "off"})
        return cls(pool, node, window_s, timeout_s)

    async def close(self) -> None:
        """Close the pool."""
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout + 1)
        except TimeoutError:
            self._pool.terminate()

    async def _run(self, name: str, method: str, *args: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
                if not self._ready:  # the first use creates the table, once per process
                    async with conn.transaction():
                        await conn.execute(_queries()["dedup_create_lock"])
                        await conn.execute(_queries()["dedup_create"])
                    self._ready = True
                return await getattr(conn, method)(_queries()[name], *args)
        except STORE_ERRORS as exc:
            raise DedupUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc

    async def seen(self, message_id: str, mail_from: str,
                   recipients: Sequence[str]) -> Seen:
        """Which of ``recipients`` no earlier submission of this message took."""
        keys = {dedup_key(message_id, mail_from, rcpt): rcpt for rcpt in recipients}
        rows = await self._run("dedup_seen", "fetch", list(keys), self._window)
        taken = {bytes(row["key"]) for row in rows}
        fresh = tuple(rcpt for key, rcpt in keys.items() if key not in taken)
        return Seen(fresh, rows[0]["queue_id"] if rows else None)

    async def record(self, message_id: str, mail_from: str, recipients: Sequence[str],
                     queue_id: str) -> None:
        """Record that ``queue_id`` took ``recipients`` of this message."""
        keys = [dedup_key(message_id, mail_from, rcpt) for rcpt in recipients]
        await self._run("dedup_record", "execute", keys, queue_id, self._node, self._window)

    async def purge(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` keys past the window; returns how many."""
        status = await self._run("dedup_purge", "execute", self._window, limit)
        return int(str(status).rsplit(" ", 1)[-1])
