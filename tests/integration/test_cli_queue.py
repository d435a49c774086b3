"""``mta queue``: operators list uncertain and held deliveries and resolve them, audited."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg

from mta.config import Settings
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id, queue_id
from mta.queue.records import AttemptOutcome
from tests.conftest import dsn_with_database
from tests.support.process import NodeProcess, run_mta, write_config


async def uncertain_pair(db_dsn: str, settings: Settings) -> tuple[str, list[int]]:
    """One message with two deliveries left uncertain by a worker."""
    store = await Store.open(db_dsn, settings)
    try:
        message_id = new_message_id()
        await store.enqueue(NewMessage(
            id=message_id, mail_from="app@example.org",
            recipients=["one@example.com", "two@example.com"], trace_headers=b"",
            body=b"x\r\n", client_address="127.0.0.1", helo_name="h", auth_user=None,
            message_id_header="<m@example.org>",
        ))
        claimed = await store.claim_due("worker-1", 10, 60.0)
        await store.record_outcomes("worker-1", [
            AttemptOutcome(d.id, "uncertain", None, "connection lost after the final dot")
            for d in claimed
        ])
        return queue_id(message_id), sorted(d.id for d in claimed)
    finally:
        await store.close()


async def test_uncertain_deliveries_are_listed_resolved_and_audited(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    qid, (first, second) = await uncertain_pair(db_dsn, make_settings())
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    config = str(write_config(node.config_path, node.sections))

    listing = await run_mta("queue", "uncertain", "--config", config)
    assert listing.returncode == 0, listing.stderr
    assert "2 uncertain" in listing.stdout and qid in listing.stdout
    assert "connection lost after the final dot" in listing.stdout

    resent = await run_mta("queue", "resend", str(first), "--reason", "remote lost it",
                           "--operator", "alice", "--config", config)
    assert resent.returncode == 0 and f"queued again: {first}" in resent.stdout, resent
    marked = await run_mta("queue", "mark-delivered", str(second), "--reason", "seen",
                           "--operator", "bob", "--config", config)
    assert marked.returncode == 0, marked

    again = await run_mta("queue", "resend", str(second), "--reason", "x", "--config", config)
    assert again.returncode == 2
    assert again.stderr.strip() == f"mta: not uncertain, left unchanged: {second}"

    audit = await run_mta("queue", "audit", "--config", config)
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert lines[0] == "# 3 audit records", "a refused attempt is audited too"
    assert lines[2].split("\t")[4:] == ["resend", "x", str(second), "-"]
    assert lines[3].split("\t")[3:] == ["bob", "mark-delivered", "seen", str(second),
                                         str(second)]
    assert lines[4].split("\t")[3:] == ["alice", "resend", "remote lost it", str(first),
                                         str(first)]

    shown = await run_mta("queue", "show", qid, "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert "possible_duplicate" in shown.stdout
    assert "by alice: remote lost it" in shown.stdout and "by bob: seen" in shown.stdout
    assert "by worker-1: connection lost after the final dot" in shown.stdout


async def test_queue_commands_refuse_bad_input_in_one_line(tmp_path: Path, db_dsn: str) -> None:
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    config = str(write_config(node.config_path, node.sections))
    for args in (("queue", "show", "not-a-queue-id"),
                 ("queue", "resend", "12", "--config", config),
                 ("queue", "resend", "abc", "--reason", "x", "--config", config)):
        result = await run_mta(*args, "--config", config) if "--config" not in args \
            else await run_mta(*args)
        assert result.returncode == 2, (args, result)
        assert "Traceback" not in result.stdout + result.stderr
    missing = await run_mta("queue", "show", queue_id(new_message_id()), "--config", config)
    assert missing.returncode == 2 and "no message" in missing.stderr


async def test_held_deliveries_are_listed_with_their_reason_and_released(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await store.enqueue(NewMessage(
            id=new_message_id(), mail_from="", recipients=["x@example.com"], trace_headers=b"",
            body=b"x\r\n", client_address="127.0.0.1", helo_name="h", auth_user=None,
            message_id_header=None,
        ))
        (delivery,) = await store.claim_due("worker-1", 1, 60.0)
        await store.release_unsent("worker-1", [delivery.id], "test setup")
        assert await store.hold([delivery.id], "breaker", "crash-loop") == {delivery.id}
    finally:
        await store.close()
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    config = str(write_config(node.config_path, node.sections))
    listing = await run_mta("queue", "held", "--config", config)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0] == "# 1 held"
    assert lines[1].split("\t")[6] == "hold_reason"
    fields = lines[2].split("\t")
    assert fields[0] == str(delivery.id) and fields[2] == "<>" and fields[6] == "crash-loop"
    released = await run_mta("queue", "release", str(delivery.id), "--reason", "fixed",
                             "--config", config)
    assert released.returncode == 0 and f"released: {delivery.id}" in released.stdout
    assert (await run_mta("queue", "held", "--config", config)).stdout.splitlines()[0] == \
        "# 0 held"


async def test_a_read_command_never_creates_a_store_or_changes_a_schema(
    tmp_path: Path, pg_admin_dsn: str,
) -> None:
    """A false all-clear ("# 0 uncertain" from a store made on the spot) is worse than an
    error: without a store there, or with a schema behind, read commands say so."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    result = await run_mta("queue", "uncertain", "--config",
                           str(write_config(empty / "node.toml",
                                            {"node": {"data_dir": str(empty / "data")}})))
    assert result.returncode == 2, result
    assert "no store here" in result.stderr and str(empty / "data") in result.stderr
    assert not (empty / "data" / "postgres").exists(), "no store was created"

    bare = f"bare_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {bare}")
    finally:
        await conn.close()
    dsn = dsn_with_database(pg_admin_dsn, bare)
    config = write_config(tmp_path / "bare.toml", {"database": {"dsn": dsn}})
    for args in (("uncertain",), ("held",), ("set-aside",)):
        result = await run_mta("queue", *args, "--config", str(config))
        assert result.returncode == 1, result
        assert "lacks migrations" in result.stderr and "mta db migrate" in result.stderr
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()


async def test_listings_say_which_config_and_store_they_read(
    tmp_path: Path, db_dsn: str,
) -> None:
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    config = str(write_config(node.config_path, node.sections))
    listing = await run_mta("queue", "held", "--config", config)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0] == "# 0 held"
    assert listing.stderr.startswith(f"read: config {config}, database ")
