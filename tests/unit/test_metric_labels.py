"""Issue 12's metric hooks: deferrals have a bounded reason and pool slot waits are
counted per share (the destination label's cap: test_destination_labels.py)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import asyncpg
import pytest

from mta.admin.metrics import Metrics
from mta.config import Settings
from mta.delivery.attempt import defer_reason
from mta.delivery.outbound.transaction import RecipientResult
from mta.errors import StoreUnavailable
from mta.queue.pool import SharedPool


def test_deferrals_are_labelled_by_a_bounded_reason() -> None:
    def result(code: int, text: str = "x", source: str = "smtp") -> RecipientResult:
        return RecipientResult("a@b", code, text, "rcpt", False, source)  # type: ignore[arg-type]

    assert defer_reason(result(451)) == "reply_4xx"
    assert defer_reason(result(0)) == "no_reply"
    assert defer_reason(result(0, source="dns_temporary")) == "dns"
    assert defer_reason(result(0, "delivery temporarily suspended: x", "local")) == "suspended"
    assert defer_reason(result(0, "store gone", "local")) == "other"


async def test_pool_slot_waits_and_timeouts_are_counted_per_share(tmp_path: Path) -> None:
    settings = Settings(node={"name": "n1", "data_dir": str(tmp_path), "intake_db_slots": 1},
                        database={"acquire_timeout": 0.05})
    metrics = Metrics("n1")
    pool = SharedPool(cast(asyncpg.Pool, None), settings, metrics.observe_acquire)
    async with pool.slot("intake"):
        with pytest.raises(StoreUnavailable):
            async with pool.slot("intake"):
                pass  # pragma: no cover

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"share": "intake"})

    assert value("mta_store_pool_acquire_timeouts_total") == 1
    assert value("mta_store_pool_acquire_wait_seconds_count") == 2
    # the timed-out wait (an event loop timer may fire a millisecond early)
    assert (value("mta_store_pool_acquire_wait_seconds_sum") or 0) >= 0.04
