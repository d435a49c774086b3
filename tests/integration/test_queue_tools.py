"""``mta queue summary | list | show | retry | hold | release | delete`` and the uncertain
evidence (issue 12, Queue tools), against a real store and the real command line."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import asyncpg
from rich.console import Console

from mta.config import Settings
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id, queue_id
from mta.queue.records import AttemptOutcome
from tests.support.delivery import only_state, submit_tagged
from tests.support.intake import store_of
from tests.support.nodes import start_node, wait_for
from tests.support.process import NodeProcess, run_mta, write_config
from tests.support.sink import Faults, running_sink


async def _enqueue(store: Store, recipients: list[str], *, sender: str = "app@example.org",
                   header: str | None = None) -> uuid.UUID:
    message_id = new_message_id()
    await store.enqueue(NewMessage(
        id=message_id, mail_from=sender, recipients=recipients,
        trace_headers=b"Received: from h by mx.test.invalid\r\n",
        body=b"Subject: hello there\r\n\r\nbody text\r\n", client_address="127.0.0.1",
        helo_name="h", auth_user=None, message_id_header=header))
    return message_id


async def _settle(store: Store, state: str, reply: str, code: int | None = None,
                  host: str | None = None) -> list[int]:
    """Claim everything due and record ``state`` for each (an attempt at ``host``)."""
    claimed = await store.claim_due("worker-1", 100, 60.0)
    await store.record_outcomes("worker-1", [
        AttemptOutcome(d.id, state, code, reply, retry_in_s=3600.0, host=host)  # type: ignore[arg-type]
        for d in claimed])
    return sorted(d.id for d in claimed)


def _config(tmp_path: Path, db_dsn: str) -> str:
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    return str(write_config(node.config_path, node.sections))


async def _states(db_dsn: str, ids: list[int]) -> dict[int, str]:
    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT id, state FROM deliveries WHERE id = ANY($1)", ids)
        return {row["id"]: row["state"] for row in rows}
    finally:
        await conn.close()


async def test_summary_counts_pending_work_by_state_destination_and_age_not_history(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await _enqueue(store, ["a@done.example"])
        await _settle(store, "delivered", "250 ok", 250)
        await _enqueue(store, ["a@slow.example", "b@slow.example"])
        await _settle(store, "deferred", "451 later", 451)
        message = await _enqueue(store, ["c@new.example"])
        size = (await store.message(message)).size_bytes  # type: ignore[union-attr]
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    result = await run_mta("queue", "summary", "--json", "--config", config)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["total"] == 3, "the delivered delivery is history, not counted"
    rows = {row["key"]: row for row in shown["rows"]}
    assert set(rows) == {"slow.example", "new.example"}
    assert rows["slow.example"]["count"] == 2 and rows["slow.example"]["<5m"] == 2
    assert rows["new.example"]["bytes"] == size
    assert {(g["state"], g["next_hop"], g["count"]) for g in shown["groups"]} == {
        ("deferred", "slow.example", 2), ("queued", "new.example", 1)}

    by_state = await run_mta("queue", "summary", "--by", "state", "--config", config)
    assert by_state.returncode == 0, by_state.stderr
    lines = by_state.stdout.splitlines()
    assert lines[0] == "# 3 deliveries with work left, by state"
    assert lines[1].split("\t")[:3] == ["state", "count", "bytes"]
    assert [line.split("\t")[:2] for line in lines[2:]] == [["queued", "1"], ["deferred", "2"]]
    bad = await run_mta("queue", "summary", "--by", "colour", "--config", config)
    assert bad.returncode == 2


async def test_list_filters_and_refuses_a_bad_filter_in_one_line(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await _enqueue(store, ["a@slow.example"], sender="one@example.org")
        deferred = await _settle(store, "deferred", "451 later", 451)
        await _enqueue(store, ["b@slow.example", "c@other.example"], sender="two@example.org")
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    async def listed(*args: str) -> list[dict[str, object]]:
        result = await run_mta("queue", "list", *args, "--json", "--config", config)
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout)["deliveries"])

    assert [d["id"] for d in await listed("--state", "deferred")] == deferred
    assert {d["recipient"] for d in await listed("--destination", "slow.example")} == {
        "a@slow.example", "b@slow.example"}
    assert {d["recipient"] for d in await listed("--sender", "two@example.org")} == {
        "b@slow.example", "c@other.example"}
    assert await listed("--older-than", "1h") == []
    assert len(await listed("--older-than", "0s")) == 3
    assert len(await listed("--limit", "2")) == 2
    piped = await run_mta("queue", "list", "--config", config)
    assert piped.stdout.splitlines()[0] == "# 3 deliveries"
    for args, words in ((("--state", "stuck"), "bad state 'stuck'"),
                        (("--older-than", "3x"), "bad age '3x'")):
        result = await run_mta("queue", "list", *args, "--config", config)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
        assert result.stdout == ""


async def test_show_finds_a_message_by_delivery_id_queue_id_or_message_id(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        first = await _enqueue(store, ["a@slow.example"], header="<same@example.org>")
        (delivery,) = await _settle(store, "deferred", "451 later", 451)
        second = await _enqueue(store, ["b@x.example"], header="<same@example.org>")
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    by_delivery = await run_mta("queue", "show", str(delivery), "--config", config)
    assert by_delivery.returncode == 0, by_delivery.stderr
    out = by_delivery.stdout
    assert f"message {queue_id(first)}" in out and queue_id(second) not in out
    assert "Subject: hello there" in out and "Received: from h" in out
    assert "body text" not in out, "the body only with --body"
    assert "next attempt " in out and "remote hosts: -\n" in out, "none reached yet"

    by_header = await run_mta("queue", "show", "same@example.org", "--config", config)
    assert by_header.returncode == 0, by_header.stderr
    assert "2 messages match" in by_header.stdout
    assert queue_id(first) in by_header.stdout and queue_id(second) in by_header.stdout

    as_json = await run_mta("queue", "show", queue_id(second), "--body", "--json",
                            "--config", config)
    assert as_json.returncode == 0, as_json.stderr
    (shown,) = json.loads(as_json.stdout)["messages"]
    assert shown["message"]["id"] == queue_id(second) and "body text" in shown["body"]
    assert shown["deliveries"][0]["state"] == "queued"
    assert shown["deliveries"][0]["next_attempt_at"] is not None


async def test_retry_hold_release_by_id_queue_id_and_filter_are_audited(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        message = await _enqueue(store, ["a@slow.example", "b@slow.example"])
        deferred = await _settle(store, "deferred", "451 later", 451)
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    retried = await run_mta("queue", "retry", str(deferred[0]), "--operator", "alice",
                            "--config", config)
    assert retried.returncode == 0, retried.stderr
    conn = await asyncpg.connect(db_dsn)
    try:
        due = await conn.fetch("SELECT id FROM deliveries WHERE state = 'queued' "
                               "AND next_attempt_at <= now() ORDER BY id")
    finally:
        await conn.close()
    assert [row["id"] for row in due] == [deferred[0]]

    held = await run_mta("queue", "hold", queue_id(message), "--reason", "abuse check",
                         "--config", config)
    assert held.returncode == 0, held.stderr
    assert set((await _states(db_dsn, deferred)).values()) == {"held"}

    unconfirmed = await run_mta("queue", "release", "--destination", "slow.example",
                                "--reason", "ok", "--config", config)
    assert unconfirmed.returncode != 0 and "2 deliveries match" in unconfirmed.stdout
    assert set((await _states(db_dsn, deferred)).values()) == {"held"}, "asked, not done"
    released = await run_mta("queue", "release", "--destination", "slow.example",
                             "--reason", "ok", "--yes", "--config", config)
    assert released.returncode == 0, released.stderr
    assert set((await _states(db_dsn, deferred)).values()) == {"queued"}

    audit = json.loads((await run_mta("queue", "audit", "--json", "--config",
                                      config)).stdout)["audit"]
    assert [(a["action"], a["changed"]) for a in audit] == [
        ("release", deferred), ("hold", deferred), ("retry", deferred[:1])]
    assert audit[2]["operator"] == "alice" and audit[1]["reason"] == "abuse check"


async def test_a_hold_by_filter_is_audited_with_its_filter(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await _enqueue(store, ["a@slow.example", "b@slow.example"])
        deferred = await _settle(store, "deferred", "451 later", 451)
        await _enqueue(store, ["c@slow.example"])
        await _enqueue(store, ["d@slow.example"], sender="other@example.org")
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    held = await run_mta("queue", "hold", "--state", "deferred", "--destination",
                         "Slow.Example", "--older-than", "0s", "--sender", "app@example.org",
                         "--reason", "abuse check", "--operator", "alice", "--yes",
                         "--config", config)
    assert held.returncode == 0, held.stderr
    assert set((await _states(db_dsn, deferred)).values()) == {"held"}
    by_id = await run_mta("queue", "release", str(deferred[0]), "--reason", "cleared",
                          "--config", config)
    assert by_id.returncode == 0, by_id.stderr

    selection = ("abuse check (filter: --state deferred --destination slow.example "
                 "--older-than 0s --sender app@example.org)")
    as_json = await run_mta("queue", "audit", "--json", "--config", config)
    assert as_json.returncode == 0, as_json.stderr
    audit = json.loads(as_json.stdout)["audit"]
    assert [(a["action"], a["reason"], a["changed"]) for a in audit] == [
        ("release", "cleared", deferred[:1]), ("hold", selection, deferred)], \
        "a filter's action names its filter; an action on ids does not"
    as_text = await run_mta("queue", "audit", "--config", config)
    assert as_text.returncode == 0, as_text.stderr
    (line,) = [line for line in as_text.stdout.splitlines() if "\thold\t" in line]
    assert f"\t{selection}\t" in line
    listed = await run_mta("queue", "held", "--json", "--config", config)
    assert [d["hold_reason"] for d in json.loads(listed.stdout)["deliveries"]] == [selection]


async def test_delete_fails_deliveries_with_evidence_but_never_leased_ones(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await _enqueue(store, ["a@spam.example"])
        (uncertain,) = await _settle(store, "uncertain", "network error after end of data")
        await _enqueue(store, ["b@spam.example"])
        (leased,) = [d.id for d in await store.claim_due("worker-2", 10, 600.0)]
        await _enqueue(store, ["c@spam.example"])
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)

    refused = await run_mta("queue", "delete", str(leased), "--reason", "spam",
                            "--config", config)
    assert refused.returncode == 2 and f"{leased} (leased)" in refused.stderr, refused
    assert (await _states(db_dsn, [leased]))[leased] == "leased"
    leased_filter = await run_mta("queue", "delete", "--state", "leased", "--reason", "x",
                                  "--yes", "--config", config)
    assert leased_filter.returncode == 2 and "leased ones never" in leased_filter.stderr

    asked = await run_mta("queue", "delete", "--destination", "spam.example", "--reason",
                          "spam", "--config", config)
    assert asked.returncode != 0 and "1 deliveries match" in asked.stdout, asked
    deleted = await run_mta("queue", "delete", "--destination", "spam.example", "--reason",
                            "spam", "--operator", "alice", "--yes", "--config", config)
    assert deleted.returncode == 0, deleted.stderr
    states = await _states(db_dsn, [uncertain, leased])
    assert states == {uncertain: "uncertain", leased: "leased"}
    again = await run_mta("queue", "delete", str(uncertain), "--reason", "spam",
                          "--include-uncertain", "--operator", "alice", "--config", config)
    assert again.returncode == 0, again.stderr

    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT state, last_reply FROM deliveries "
                                "WHERE state = 'failed' ORDER BY id")
        dsns = await conn.fetchval("SELECT count(*) FROM messages WHERE mail_from = ''")
    finally:
        await conn.close()
    assert [(r["state"], r["last_reply"]) for r in rows] == [
        ("failed", "deleted by alice: spam"),
        ("failed", "deleted by alice: spam (filter: --destination spam.example)")]
    assert dsns == 0, "no DSN without --bounce"
    shown = await run_mta("queue", "list", "--state", "failed", "--config", config)
    assert shown.stdout.splitlines()[0] == "# 2 deliveries", "the records stay"
    audit = json.loads((await run_mta("queue", "audit", "--json", "--config",
                                      config)).stdout)["audit"]
    assert [a["action"] for a in audit] == ["delete", "delete", "delete"]
    assert audit[0]["changed"] == [uncertain] and audit[2]["changed"] == []


async def test_uncertain_lists_the_evidence_to_decide(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        await _enqueue(store, ["a@x.example"])
        (delivery,) = await _settle(store, "uncertain", "network error after end of data",
                                    host="mx1.x.example")
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)
    result = await run_mta("queue", "uncertain", "--json", "--config", config)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["deliveries"]
    assert row["id"] == delivery
    evidence = row["evidence"]
    assert evidence["dot_written"] == "yes" and evidence["recorded_at"] != "-"
    assert evidence["remote_host"] == "mx1.x.example" and evidence["reply_lost_after"] == "-"
    piped = await run_mta("queue", "uncertain", "--config", config)
    assert "remote_host\tattempt_started\tdot_written\treply_lost_after" in piped.stdout
    shown = await run_mta("queue", "show", str(delivery), "--json", "--config", config)
    assert json.loads(shown.stdout)["messages"][0]["remote_hosts"] == ["mx1.x.example"]
    text = await run_mta("queue", "show", str(delivery), "--config", config)
    assert "remote hosts: mx1.x.example" in text.stdout and "at mx1.x.example" in text.stdout


def test_a_narrow_terminal_wraps_other_columns_never_ids() -> None:
    from mta.cli.queue_common import print_table

    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=True, color_system=None)
    qid = queue_id(new_message_id())
    print_table("1 deliveries", ["delivery", "queue_id", "to", "last_evidence"],
                [["123456789", qid, "someone@example.com", "451 4.7.1 try again later " * 3]],
                out=console)
    text = out.getvalue()
    assert qid in text and "123456789" in text


async def test_delete_with_bounce_commits_one_dsn_per_message(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        message = await _enqueue(store, ["a@spam.example", "b@spam.example"])
    finally:
        await store.close()
    config = _config(tmp_path, db_dsn)
    deleted = await run_mta("queue", "delete", queue_id(message), "--reason", "spam",
                            "--operator", "alice", "--bounce", "--config", config)
    assert deleted.returncode == 0, deleted.stderr
    conn = await asyncpg.connect(db_dsn)
    try:
        dsns = await conn.fetch("SELECT m.body, d.recipient FROM messages AS m "
                                "JOIN deliveries AS d ON d.message_id = m.id "
                                "WHERE m.mail_from = ''")
        states = await conn.fetch("SELECT state FROM deliveries WHERE message_id = $1",
                                  message)
    finally:
        await conn.close()
    assert [r["state"] for r in states] == ["failed", "failed"]
    (dsn,) = dsns
    assert dsn["recipient"] == "app@example.org"
    body = bytes(dsn["body"])
    assert b"deleted by alice: spam" in body
    assert b"a@spam.example" in body and b"b@spam.example" in body
    assert b"Status: 5.0.0" in body


async def test_uncertain_says_how_long_after_the_dot_the_reply_was_lost(
    tmp_path: Path, db_dsn: str, make_settings: Callable[..., Settings]
) -> None:
    """A real node sends to a sink that never answers the dot: the evidence names when
    the attempt started, when the dot went out, and the 2 s until the reply was lost."""
    async with running_sink(faults=Faults(hang=True), hang_limit=30) as hung:
        node = await start_node(make_settings(delivery={
            "enabled": True, "poll_interval": 60.0, "data_end_timeout": 2.0,
            "routes": [{"domain": "*", "host": "127.0.0.1", "port": hung.port,
                        "tls": "none"}]}))
        try:
            message = await submit_tagged(node.port, "lost", recipients=["a@hung.example"])

            async def uncertain() -> bool:
                return await only_state(store_of(node), message) == "uncertain"

            await wait_for(uncertain, timeout=15)
        finally:
            hung.release()
            await node.stop()
    result = await run_mta("queue", "uncertain", "--json", "--config",
                           _config(tmp_path, db_dsn))
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["deliveries"]
    evidence = row["evidence"]
    assert evidence["remote_host"] != "-" and evidence["dot_written"] == "yes"
    started = datetime.fromisoformat(evidence["attempt_started"])
    dot_at = datetime.fromisoformat(evidence["dot_at"])
    assert started <= dot_at <= datetime.fromisoformat(evidence["recorded_at"])
    lost_after = float(evidence["reply_lost_after"].removesuffix("s"))
    assert 2.0 <= lost_after < 10.0, evidence
