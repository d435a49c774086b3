"""The delivery journal: encoding, group commit, rotation, cleanup, replay and locks."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
from pathlib import Path

import pytest

from mta.journal.records import (
    Applied,
    DotPending,
    JournalCorrupt,
    JournalError,
    JournalFailed,
    JournalFull,
    JournalLocked,
    ReplyReceived,
    decode,
    encode,
    read_segment,
)
from mta.journal.replay import ReplayResult, adopt
from mta.journal.writer import Journal
from tests.support.journal import pending, segment_paths


def started(attempt_id: str, *delivery_ids: int) -> DotPending:
    return DotPending(attempt_id, delivery_ids or (1,), "msg-1", "mx.example", 1.5)


def reply(attempt_id: str, delivery_id: int = 1, code: int = 250) -> ReplyReceived:
    return ReplyReceived(attempt_id, delivery_id, code, "2.0.0 Ok", True, 2.5)


class CountingFsync:
    """An fsync that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


def test_records_round_trip_through_one_line() -> None:
    for record in (started("a", 1, 2, 3), reply("a", 2, 451), Applied("a", 3.0),
                   ReplyReceived("a", 1, 0, "timeout\nafter dot ü", False, 4.0)):
        line = encode(record)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode(line[:-1]) == record


def test_decode_rejects_a_flipped_byte() -> None:
    line = bytearray(encode(started("a")))
    line[20] ^= 0x01
    with pytest.raises(ValueError):
        decode(bytes(line[:-1]))


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "w.00000001.jrnl"
    whole = encode(started("a")) + encode(started("b"))
    for torn in (encode(started("c"))[:17], b"0000\x00\x00", b"deadbeef {}\n"):
        path.write_bytes(whole + torn)
        assert [r.attempt_id for r in read_segment(path)] == ["a", "b"]


def test_corrupt_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "w.00000001.jrnl"
    bad = bytearray(encode(started("b")))
    bad[15] ^= 0x01
    path.write_bytes(encode(started("a")) + bytes(bad) + encode(started("c")))
    with pytest.raises(JournalCorrupt, match="line 2"):
        read_segment(path)


async def test_concurrent_durable_appends_share_fsyncs(tmp_path: Path) -> None:
    fsync = CountingFsync()
    journal = Journal.open(tmp_path, "w", fsync=fsync)
    await journal.flush()
    before = fsync.calls
    await asyncio.gather(*(journal.append_durable(started(f"a{i}")) for i in range(200)))
    assert 1 <= fsync.calls - before < 20
    await journal.close()
    assert len(read_segment(segment_paths(tmp_path, "w")[0])) == 200


async def test_durable_append_returns_after_its_fsync(tmp_path: Path) -> None:
    synced: list[int] = []

    def fsync(fd: int) -> None:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode):
            synced.append(status.st_size)

    journal = Journal.open(tmp_path, "w", fsync=fsync)
    await journal.append_durable(started("a"))
    assert synced[-1] == len(encode(started("a")))
    await journal.close()


async def test_failed_fsync_refuses_every_later_append(tmp_path: Path) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    journal = Journal.open(tmp_path, "w", fsync=broken)
    with pytest.raises(JournalFailed, match="fsync failed"):
        await journal.append_durable(started("a"))
    with pytest.raises(JournalFailed):
        journal.append(Applied("a", 3.0))
    await journal.close()


async def test_segments_rotate_by_size(tmp_path: Path) -> None:
    line = len(encode(started("a000")))
    journal = Journal.open(tmp_path, "w", segment_bytes=3 * line)
    for i in range(7):
        await journal.append_durable(started(f"a{i:03d}"))
    assert [len(read_segment(p)) for p in segment_paths(tmp_path, "w")] == [3, 3, 1]
    assert [p.name for p in segment_paths(tmp_path, "w")] == [
        "w.00000001.jrnl", "w.00000002.jrnl", "w.00000003.jrnl"]
    await journal.close()


async def test_fully_applied_segments_are_deleted_oldest_first(tmp_path: Path) -> None:
    line = len(encode(started("a000")))
    journal = Journal.open(tmp_path, "w", segment_bytes=2 * line)
    for i in range(4):
        await journal.append_durable(started(f"a{i:03d}"))
    first, second = segment_paths(tmp_path, "w")
    journal.append(Applied("a002", 3.0))  # the second segment's attempts, not the first's
    journal.append(Applied("a003", 3.0))
    await journal.flush()
    assert segment_paths(tmp_path, "w")[:2] == [first, second], "only a prefix is deleted"
    journal.append(Applied("a000", 3.0))
    journal.append(Applied("a001", 3.0))
    await journal.flush()
    assert first not in segment_paths(tmp_path, "w") and second not in segment_paths(tmp_path, "w")
    assert not first.exists() and not second.exists()
    await journal.close()
    assert pending(tmp_path) == ReplayResult()


async def test_attempts_stop_when_max_segments_hold_unapplied_work(tmp_path: Path) -> None:
    line = len(encode(started("a000")))
    journal = Journal.open(tmp_path, "w", segment_bytes=line, max_segments=2)
    await journal.append_durable(started("a000"))
    await journal.append_durable(started("a001"))
    with pytest.raises(JournalFull):
        await journal.append_durable(started("a002"))
    await journal.append_durable(reply("a000"))  # replies are always written
    journal.append(Applied("a000", 3.0))
    journal.append(Applied("a001", 3.0))
    await journal.append_durable(started("a002"))  # the lazy Applied records free space
    await journal.close()


async def test_replay_classifies_replied_unanswered_and_applied(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, "w")
    await journal.append_durable(started("done", 1))
    await journal.append_durable(reply("done", 1))
    journal.append(Applied("done", 3.0))
    await journal.append_durable(started("replied", 2, 3))
    await journal.append_durable(reply("replied", 2, 250))
    await journal.append_durable(reply("replied", 3, 550))
    await journal.append_durable(started("half", 4, 5))
    await journal.append_durable(reply("half", 4, 0))
    await journal.append_durable(started("silent", 6))
    await journal.close()

    result = pending(tmp_path)
    assert [a.dot.attempt_id for a in result.replied] == ["replied"]
    assert [r.code for r in result.replied[0].replies] == [250, 550]
    assert {a.dot.attempt_id: a.missing for a in result.unanswered} == {
        "half": (5,), "silent": (6,)}
    assert result.unanswered[0].owner == "w"


async def test_an_owner_is_never_reopened_its_old_segments_are_adopted(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, "w")
    await journal.append_durable(started("old"))
    await journal.close()
    with pytest.raises(JournalError, match="earlier process"):
        Journal.open(tmp_path, "w")
    (old_segment,) = segment_paths(tmp_path, "w")
    with adopt(tmp_path) as adoption:
        assert [a.dot.attempt_id for a in adoption.pending.unanswered] == ["old"]
        adoption.commit()
    assert not old_segment.exists()


async def test_live_owner_is_not_adopted(tmp_path: Path) -> None:
    live = Journal.open(tmp_path, "live")
    await live.append_durable(started("busy"))
    dead = Journal.open(tmp_path, "dead")
    await dead.append_durable(started("orphaned"))
    await dead.close()

    with pytest.raises(JournalLocked):
        Journal.open(tmp_path, "live")
    with adopt(tmp_path) as adoption:
        assert [a.owner for a in adoption.pending.unanswered] == ["dead"]
        with pytest.raises(JournalLocked):
            Journal.open(tmp_path, "dead")  # the adopter holds the dead owner's lock
        adoption.commit()
    assert pending(tmp_path) == ReplayResult()
    assert segment_paths(tmp_path, "live")[0].exists()
    await live.close()
    assert [a.owner for a in pending(tmp_path).unanswered] == ["live"]


def test_foreign_lock_holder_counts_as_alive(tmp_path: Path) -> None:
    (tmp_path / "other.00000001.jrnl").write_bytes(encode(started("x")))
    with (tmp_path / "other.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert pending(tmp_path).unanswered == ()
    assert len(pending(tmp_path).unanswered) == 1


def test_owner_names_cannot_escape_the_naming_scheme(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Journal.open(tmp_path, "a.b")


def test_processes_starting_at_once_agree_on_the_journal_identity(tmp_path: Path) -> None:
    """A node's processes start together: one identity for the directory, whoever wins."""
    from concurrent.futures import ThreadPoolExecutor

    from mta.journal.files import journal_identity

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = set(pool.map(lambda _: journal_identity(tmp_path / "journal"), range(32)))
    assert len(found) == 1
    assert [p.name for p in (tmp_path / "journal").iterdir()] == ["identity"]


async def test_backlog_counts_attempts_the_store_has_not_taken_yet(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, "w")
    await journal.append_durable(started("a", 1))
    await journal.append_durable(started("b", 2))
    await journal.append_durable(reply("a", 1))
    assert journal.backlog == 2
    journal.append(Applied("a", 3.0))
    assert journal.backlog == 1
    await journal.close()
