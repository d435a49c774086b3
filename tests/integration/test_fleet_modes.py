"""``mta fleet drain | isolate | activate | status`` against real node processes: through
the admin API, through the store when the API is down, and audited when the fleet
database is down (an emergency never waits for the audit)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mta.intake import replies
from mta.queue import Store
from tests.support.admin import admin_get
from tests.support.fleet import FleetUnderTest, enqueue_tagged
from tests.support.nodes import free_port
from tests.support.sink import Sink
from tests.support.smtp import RawSMTP


async def test_drain_isolate_and_activate_through_the_admin_api(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port})
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await fleet.start()
        isolated = await fleet.fleet("isolate", "a", "--reason", "seed 1 drill",
                                     "--operator", "alice")
        assert isolated.returncode == 0, isolated.stderr
        assert "a: isolated (via admin API)" in isolated.stdout
        await enqueue_tagged(store, [f"i{n}" for n in range(5)])
        client = await RawSMTP.connect(fleet.nodes["a"].smtp_port)
        assert client.greeting == replies.NODE_NOT_ACTIVE.format(mode="isolated")
        await client.close()

        drained = await fleet.fleet("drain", "a", "--reason", "let it empty")
        assert drained.returncode == 0, drained.stderr
        await sink.wait_for_count(5, timeout=20)
        client = await RawSMTP.connect(fleet.nodes["a"].smtp_port)
        assert client.greeting == replies.NODE_NOT_ACTIVE.format(mode="draining")
        await client.close()

        activated = await fleet.fleet("activate", "a", "--reason", "drill over")
        assert activated.returncode == 0, activated.stderr
        status, _ = await admin_get(fleet.nodes["a"].admin_port, "/readyz")
        assert status == 200
        actions = [(r.action, r.operator) for r in await store.audit_records()]
        assert ("mode:isolated", "alice") in actions
        assert [a for a, _ in actions][:3] == ["mode:active", "mode:draining", "mode:isolated"]
    finally:
        await store.close()
        await fleet.close()


async def test_isolate_with_the_admin_api_down_goes_through_the_store_and_sticks(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port})
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await enqueue_tagged(store, ["held-1", "held-2"])
        result = await fleet.fleet("isolate", "a", "--reason", "node is sick")
        assert result.returncode == 0, result.stderr
        assert "admin API unreachable" in result.stderr
        assert "wrote the mode into its store" in result.stderr
        assert "a: isolated (via store)" in result.stdout
        mode = await store.node_mode("a")
        assert mode is not None and mode.mode == "isolated"

        await fleet.start()
        status, body = await admin_get(fleet.nodes["a"].admin_port, "/readyz")
        assert status == 503 and json.loads(body)["mode"] == "isolated"
        assert sink.transactions == [], "an isolated node never starts delivering on its own"
    finally:
        await store.close()
        await fleet.close()


async def test_isolate_with_the_fleet_database_down_acts_and_audits_on_the_node(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port})
    fleet.database = f"postgresql://postgres@127.0.0.1:{free_port()}/fleet"
    fleet.write()
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await fleet.start()
        result = await fleet.fleet("isolate", "a", "--reason", "store is slow",
                                   "--operator", "bob", "--data-dir", str(tmp_path / "fd"))
        assert result.returncode == 0, result.stderr
        assert "spool" in result.stderr
        mode = await store.node_mode("a")
        assert mode is not None and mode.mode == "isolated"
        (record, *_) = await store.audit_records()
        assert (record.action, record.operator, record.reason) == (
            "mode:isolated", "bob", "store is slow")
    finally:
        await store.close()
        await fleet.close()


async def test_status_shows_every_node_and_an_unreachable_one_as_unreachable(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port, "b": sink.port})
    fleet.extra_entries.append({
        "name": "gone", "smtp": f"127.0.0.1:{free_port()}",
        "admin": f"http://127.0.0.1:{free_port()}", "token": "x",
        "store": f"postgresql://postgres@127.0.0.1:{free_port()}/gone"})
    fleet.write()
    store = await Store.open(fleet.dsns["b"], fleet.settings("b"))
    try:
        await store.set_node_mode("b", "isolated", "drill", "alice")
        await enqueue_tagged(store, ["s1", "s2", "s3"])
        await fleet.start("a")  # b's daemon is down: its row comes from its store
        as_json = await fleet.fleet("status", "--json")
        assert as_json.returncode == 0, as_json.stderr
        rows = {row["node"]: row for row in json.loads(as_json.stdout)}
        assert rows["a"]["source"] == "admin API" and rows["a"]["ready"] is True
        assert rows["b"]["source"] == "store" and rows["b"]["mode"] == "isolated"
        assert rows["b"]["by_state"]["queued"] == 3
        assert rows["gone"]["source"] == "unreachable" and rows["gone"]["mode"] is None

        piped = await fleet.fleet("status")
        assert piped.returncode == 0, piped.stderr
        table = [line.split("\t") for line in piped.stdout.splitlines()[1:]]
        header, lines = table[0], {line[0]: dict(zip(table[0], line, strict=True))
                                   for line in table[1:]}
        assert header[:3] == ["node", "source", "mode"]
        assert lines["b"]["queued"] == "3" and lines["b"]["mode"] == "isolated"
        assert lines["gone"]["source"] == "unreachable"
    finally:
        await store.close()
        await fleet.close()


async def test_a_bad_inventory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from tests.support.process import run_mta

    cases = {
        "unknown key": '[[nodes]]\nname = "a"\nsmtp = "127.0.0.1:25"\n'
                       'admin = "http://127.0.0.1:9325"\nstore = "postgresql://x/y"\ncolour = 1\n',
        "listed twice": ('[[nodes]]\nname = "a"\nsmtp = "127.0.0.1:25"\n'
                         'admin = "http://127.0.0.1:9325"\nstore = "postgresql://x/y"\n') * 2,
        "is not set": '[[nodes]]\nname = "a"\nsmtp = "127.0.0.1:25"\n'
                      'admin = "http://127.0.0.1:9325"\nstore = "postgresql://x/y"\n'
                      'token_env = "MTA_TEST_NO_SUCH_TOKEN"\n',
    }
    for expected, text in cases.items():
        path = tmp_path / "fleet.toml"
        path.write_text(text)
        result = await run_mta("fleet", "status", "--fleet", str(path))
        assert result.returncode == 2, (expected, result)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr
    missing = await run_mta("fleet", "status", "--fleet", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
    unknown = await run_mta("fleet", "drain", "zz", "--reason", "x", "--fleet", str(path))
    assert unknown.returncode == 2
