"""kill -9 of a journal writer: every append that returned is found by replay (I3)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from mta.journal.replay import adopt
from tests.support.journal import pending

CHILD = Path(__file__).parents[1] / "support" / "journal_child.py"
DEADLINE = 30.0


async def start_child(directory: Path, **env: str) -> asyncio.subprocess.Process:
    """The writer: 4 workers, 8 KiB segments so that the kill lands among rotations."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MTA_FAULT_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), str(directory), "writer", "4", str(8 * 1024),
        stdout=asyncio.subprocess.PIPE, env={**base, **env})


async def read_ids(process: asyncio.subprocess.Process, until: int | None = None) -> list[str]:
    """Ids the child printed: ``until`` of them, or all of them up to its exit."""
    assert process.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    ids: list[str] = []
    while until is None or len(ids) < until:
        line = await asyncio.wait_for(process.stdout.readline(), deadline - loop.time())
        if not line:
            break
        ids.append(line.decode().strip())
    return ids


def replayed_ids(directory: Path) -> set[str]:
    return {attempt.dot.attempt_id for attempt in pending(directory).unanswered}


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("writer.*.jrnl"))


def tear_last_segment(directory: Path) -> None:
    """Leave half a line at the end, as a crash in the middle of a write would."""
    last = segments(directory)[-1]
    with last.open("ab") as segment:
        segment.write(b'0badf00d {"t":"started","attempt_id":"torn"')


async def test_sigkill_keeps_every_returned_append(tmp_path: Path) -> None:
    child = await start_child(tmp_path)
    printed = await read_ids(child, until=400)
    child.kill()
    printed += await read_ids(child)
    assert await asyncio.wait_for(child.wait(), DEADLINE) == -signal.SIGKILL
    assert len(segments(tmp_path)) > 1, "the kill came after rotations"

    found = replayed_ids(tmp_path)
    assert set(printed) <= found
    tear_last_segment(tmp_path)
    assert replayed_ids(tmp_path) == found


@pytest.mark.parametrize("point", ["journal.after_append", "journal.before_fsync"])
async def test_kill_at_fault_point_keeps_every_returned_append(tmp_path: Path,
                                                               point: str) -> None:
    child = await start_child(tmp_path, MTA_FAULT_HOOKS="1", MTA_FAULT_KILL_AT=point,
                              MTA_FAULT_KILL_AFTER="50")
    printed = await read_ids(child)
    assert await asyncio.wait_for(child.wait(), DEADLINE) == -signal.SIGKILL

    found = replayed_ids(tmp_path)
    assert set(printed) <= found
    assert found - set(printed), "appends were in flight at the kill"
    tear_last_segment(tmp_path)
    assert replayed_ids(tmp_path) == found

    with adopt(tmp_path) as adoption:
        assert {a.dot.attempt_id for a in adoption.pending.unanswered} == found
