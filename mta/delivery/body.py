"""A message's content on its way out: read right before DATA, within the sending budget."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mta.concurrency import ByteBudget
from mta.errors import StoreUnavailable
from mta.queue.body_codec import CorruptBody
from mta.queue.records import Envelope
from mta.queue.store import Store

#: Bytes of a body handed to the SMTP client at a time.
BODY_CHUNK_BYTES = 64 * 1024


class Body:
    """A message's content, read only right before DATA and held only while it is written.

    ``load`` takes the message's size from the process's sending budget (``workers`` times
    the largest message size), then reads the body: the bodies in memory for delivery
    never pass that budget (I4), whatever the number of sessions waiting for a slow
    server, while many small messages go out at once. The bytes are given back as soon
    as the content has been handed to the connection (before the reply to the dot,
    which a hung server may never send), or when the attempt ends.
    """

    def __init__(self, store: Store, envelope: Envelope, sending: ByteBudget) -> None:
        self._store = store
        self._message_id = envelope.id
        self._size = envelope.size_bytes
        self._sending = sending
        self._holding = 0
        self._content: tuple[bytes, bytes] | None = None
        #: Why the body could not be read (the attempt stopped before DATA).
        self.unavailable: StoreUnavailable | None = None
        #: Why the stored body does not decode (nothing was sent; it will not heal).
        self.corrupt: CorruptBody | None = None

    async def load(self) -> None:
        """Take the body's size from the sending budget, then read it; raises if the store
        cannot give it."""
        self._holding = await self._sending.acquire(self._size)
        try:
            content = await self._store.message_content(self._message_id)
        except StoreUnavailable as exc:
            self.unavailable = exc
            raise
        except CorruptBody as exc:
            self.corrupt = exc
            raise
        if content is None:
            raise LookupError("the message is gone from the store")
        self._content = content

    async def chunks(self) -> AsyncIterator[bytes]:
        """The trace headers, then the body in bounded slices; its bytes are freed after."""
        try:
            if self._content is None:
                raise LookupError("the body was not loaded before DATA")
            trace, body = self._content
            yield trace
            view = memoryview(body)
            for start in range(0, len(view), BODY_CHUNK_BYTES):
                yield bytes(view[start:start + BODY_CHUNK_BYTES])
        finally:
            self.release()

    def release(self) -> None:
        """Drop the content and give its bytes back to the budget (once)."""
        self._content = None
        if self._holding:
            self._sending.release(self._holding)
            self._holding = 0
