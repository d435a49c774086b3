"""A journal writer for crash tests.

``python journal_child.py DIRECTORY OWNER WORKERS SEGMENT_BYTES``: WORKERS tasks append
durable ``DotPending`` records until killed, and print each attempt id once its
append has returned.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path

from mta.journal.records import DotPending
from mta.journal.writer import Journal


async def main(directory: Path, owner: str, workers: int, segment_bytes: int) -> None:
    """Append until killed."""
    journal = Journal.open(directory, owner, segment_bytes=segment_bytes, max_segments=10_000)

    async def work(worker: int) -> None:
        for n in itertools.count():
            attempt_id = f"{worker}-{n}"
            record = DotPending(attempt_id, (n,), f"msg-{worker}", "mx.example", time.time())
            await journal.append_durable(record)
            print(attempt_id, flush=True)

    await asyncio.gather(*(work(worker) for worker in range(workers)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
