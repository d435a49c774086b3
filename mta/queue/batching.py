"""What the group-commit writers share: write a batch, and when the store refuses one
caller's values, write each caller alone so that only that caller gets the refusal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from mta.errors import StoreRejected

Item = TypeVar("Item")


async def write_batch(batch: Sequence[tuple[Item, asyncio.Future[None]]],
                      write_all: Callable[[list[Item]], Awaitable[object]],
                      write_one: Callable[[Item], Awaitable[object]]) -> None:
    """Write ``batch``'s items with ``write_all`` and tell each caller its result; on a
    refusal of a batch of several, each item again with ``write_one``."""
    try:
        await write_all([item for item, _ in batch])
    except StoreRejected as exc:
        if len(batch) == 1:
            settle(batch, exc)
            return
        for one in batch:
            try:
                await write_one(one[0])
            except Exception as alone:
                settle([one], alone)
            else:
                settle([one], None)
    except Exception as exc:  # every caller of this batch gets it
        settle(batch, exc)
    else:
        settle(batch, None)


def settle(batch: Sequence[tuple[object, asyncio.Future[None]]],
           error: BaseException | None) -> None:
    """Tell each caller of ``batch`` its result (``error``, or committed)."""
    for _, done in batch:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
            done.exception()  # retrieved: a cancelled caller no longer waits
