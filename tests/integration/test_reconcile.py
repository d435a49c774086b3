"""Reconcile (I3): after a node process is SIGKILLed with attempts in flight, recovery of
its journal and leases says per delivery what is certainly delivered, certainly not
delivered and uncertain, matching what the sinks really received; a second run changes
nothing. ``POST /v1/reconcile`` runs it in a running node, behind the bearer token,
without touching a live process's leases or a reroute's."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mta.config import Settings, load_settings
from mta.delivery.owner import owner_prefix
from mta.delivery.reconcile import ReconcileReport, journal_dir
from mta.journal.files import journal_identity
from mta.journal.writer import Journal
from mta.queue.ids import queue_id
from mta.supervisor import reconcile_offline
from tests.support.delivery import states_by_id, submit_tagged
from tests.support.intake import running_node, store_of
from tests.support.nodes import free_port, wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Faults, Sink, running_sink

SIGKILL_STATUS = -9
TIMEOUT = aiohttp.ClientTimeout(total=10)


def entries(report: ReconcileReport) -> dict[str, set[tuple[str | None, str | None]]]:
    """Each list of the report as (message id, recipient) pairs."""
    return {name: {(str(e.message_id), e.recipient) for e in getattr(report, name)}
            for name in ("delivered", "not_delivered", "uncertain")}


async def test_offline_reconcile_after_a_kill_matches_what_the_sinks_received(
    tmp_path: Path, db_dsn: str,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        ok = await stack.enter_async_context(running_sink(
            faults=Faults(reject={"bad@ok.example": "550 5.1.1 no such user"})))
        hung = await stack.enter_async_context(running_sink(faults=Faults(hang=True)))
        silent = await stack.enter_async_context(running_sink(faults=Faults(greet=False)))
        await check_offline_reconcile(tmp_path, db_dsn, ok, hung, silent)


async def check_offline_reconcile(tmp_path: Path, db_dsn: str, ok: Sink, hung: Sink,
                                  silent: Sink) -> None:
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"workers": 4}, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": domain, "host": "127.0.0.1", "port": sink.port, "tls": "none"}
                   for domain, sink in (("ok.example", ok), ("hang.example", hung),
                                        ("silent.example", silent))],
    })
    # The first reply journaled kills the process before the store hears of it.
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": "delivery.after_reply_journaled"}
    await node.start()
    try:
        # In flight at the kill: a dot pending with no reply (the sink holds the reply)...
        dot_pending = await submit_tagged(node.smtp_port, "dot", recipients=["u@hang.example"])
        await hung.wait_until(lambda sink: len(sink.transactions) == 1, timeout=15)
        # ...a lease that never got to its dot (the destination never greets)...
        no_dot = await submit_tagged(node.smtp_port, "nodot", recipients=["u@silent.example"])
        await wait_for(lambda: silent.connections >= 1, timeout=15)
        # ...and replies journaled, not applied: a 250 for one recipient, a 550 for another.
        replied = await submit_tagged(node.smtp_port, "replied",
                                      recipients=["good@ok.example", "bad@ok.example"])
        assert await node.wait_exit(15) == SIGKILL_STATUS
    finally:
        await node.close()
    before = await states_by_id(db_dsn)
    assert sorted(before.values()) == ["leased"] * 4, "every delivery was in flight at the kill"
    settings = load_settings(node.config_path)
    first = await reconcile_offline(settings)

    assert entries(first) == {
        "delivered": {(str(replied), "good@ok.example")},
        "not_delivered": {(str(replied), "bad@ok.example"), (str(no_dot), "u@silent.example")},
        "uncertain": {(str(dot_pending), "u@hang.example")},
    }
    # What the sinks received: the 250'd copy once, the rejected recipient never, the
    # never-greeting destination nothing, and the hung one the whole message (its reply
    # never came back: it may well have been delivered, so it is uncertain).
    assert ok.count("replied@test", "good@ok.example") == 1
    assert ok.count("replied@test", "bad@ok.example") == 0
    assert silent.transactions == []
    assert [t.message_id for t in hung.transactions] == ["dot@test"]

    (delivered,) = first.delivered
    assert delivered.state == "delivered" and delivered.reply_code == 250
    assert delivered.reply is not None and delivered.reply.startswith("250 2.0.0 Ok: received")
    how = {e.recipient: (e.how, e.state, e.reply_code) for e in first.not_delivered}
    assert how == {"bad@ok.example": ("failed", "failed", 550),
                   "u@silent.example": ("requeued", "queued", None)}
    (doubt,) = first.uncertain
    assert doubt.state == "uncertain" and "final dot pending" in doubt.evidence
    body = first.to_json()
    assert body["changed"] is True and body["delivered"][0]["recipient"] == "good@ok.example"
    assert [e["queue_id"] for e in body["uncertain"]] == [queue_id(dot_pending)]

    after_first = await states_by_id(db_dsn)
    second = await reconcile_offline(settings)
    assert second.to_json() == {"changed": False, "delivered": [], "not_delivered": [],
                                "uncertain": [], "set_aside": 0}
    assert await states_by_id(db_dsn) == after_first, "a second run changes nothing"
    assert ok.count("replied@test", "good@ok.example") == 1, "nothing was sent meanwhile"


async def post(port: int, path: str, token: str | None = None, body: Any = None,
               raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.post(
            f"http://127.0.0.1:{port}{path}", headers=headers,
            json=body if raw is None else None, data=raw) as response:
        return response.status, await response.json()


async def test_post_reconcile_needs_the_token_and_answers_empty_lists_on_a_healthy_node(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n"})
    async with running_node(settings) as node:
        port = node.admin_port
        assert (await post(port, "/v1/reconcile"))[0] == 401
        assert (await post(port, "/v1/reconcile", "guess"))[0] == 403
        assert (await post(port, "/v1/reconcile", "t0k3n", raw=b"{nope"))[0] == 400
        assert (await post(port, "/v1/reconcile", "t0k3n", {"by": 7}))[0] == 400
        empty = {"changed": False, "delivered": [], "not_delivered": [], "uncertain": [],
                 "set_aside": 0}
        assert await post(port, "/v1/reconcile", "t0k3n") == (200, empty)
        assert await post(port, "/v1/reconcile", "t0k3n",
                          {"by": "alice", "reason": "after the outage"}) == (200, empty)


async def test_post_reconcile_releases_a_dead_owners_lease_and_nothing_else(
    make_settings: Callable[..., Settings],
) -> None:
    """Three owners lease one delivery each: a process of this node that died before its
    dot, one that is alive (it holds its journal lock), and a reroute run. Only the dead
    one's delivery goes back to the queue."""
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n"})
    prefix = owner_prefix(settings.node.name)
    dead, live, reroute = f"{prefix}999-1", f"{prefix}998-2", f"reroute:{prefix}1"
    directory = journal_dir(settings)
    directory.mkdir(parents=True)
    identity = journal_identity(directory)
    async with running_node(settings) as node:  # delivery off: only these owners lease
        store = store_of(node)
        leased: dict[str, tuple[uuid.UUID, int]] = {}
        for owner in (dead, live, reroute):
            message = await submit_tagged(node.port, owner.replace(":", "_"))
            (claimed,) = await store.claim_due(owner, 1, 300.0)
            assert claimed.message_id == message
            leased[owner] = (message, claimed.id)
        for owner in (dead, live):
            await store.register_journal_owner(owner, identity)
        await (Journal.open(directory, dead)).close()  # a journal without a dot: died
        alive = Journal.open(directory, live)  # its lock is held: a live process
        try:
            status, body = await post(node.admin_port, "/v1/reconcile", "t0k3n",
                                      {"by": "alice", "reason": "test"})
            assert status == 200, body
            assert body["delivered"] == [] and body["uncertain"] == []
            (requeued,) = body["not_delivered"]
            assert (requeued["delivery_id"], requeued["how"], requeued["state"]) == (
                leased[dead][1], "requeued", "queued")
            assert requeued["message_id"] == str(leased[dead][0])
            assert "certainly not sent" in requeued["evidence"]
            states = {owner: (await store.deliveries(message))[0]
                      for owner, (message, _) in leased.items()}
            assert states[dead].state == "queued"
            assert (states[live].state, states[live].lease_owner) == ("leased", live)
            assert (states[reroute].state, states[reroute].lease_owner) == ("leased", reroute)
            again = await post(node.admin_port, "/v1/reconcile", "t0k3n")
            assert again == (200, {"changed": False, "delivered": [], "not_delivered": [],
                                   "uncertain": [], "set_aside": 0})
        finally:
            await alive.close()


async def test_post_reconcile_answers_503_while_the_store_is_unreachable(
    make_settings: Callable[..., Settings],
) -> None:
    port = free_port()  # nothing listens there: the node waits for its store (I7)
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n"},
                             database={"dsn": f"postgresql://mta@127.0.0.1:{port}/mta",
                                       "connect_timeout": 1.0})
    async with running_node(settings) as node:
        status, body = await post(node.admin_port, "/v1/reconcile", "t0k3n")
        assert status == 503 and "not reachable" in body["error"]
