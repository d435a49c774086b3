"""The fleet audit (DESIGN.md Audit, I9) and the fleet's connection budget (I6), on real
Postgres: the spool when the fleet database is down, copied in exactly once when it is
back; ``mta fleet audit`` merging the fleet database, the spool and the nodes' tables;
``mta fleet config-check`` summing nodes that share a server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from mta.fleet.audit import (
    REJECTED_NAME,
    SPOOL_NAME,
    STORE_DIR,
    FleetAction,
    FleetAudit,
)
from mta.fleet.inventory import Fleet, FleetSection, NodeEntry
from mta.fleet.stores import open_node_store
from mta.queue import EmbeddedPostgres, Store
from mta.queue.migrate import available_migrations
from tests.support.fleet import FleetUnderTest, enqueue_tagged
from tests.support.nodes import free_port
from tests.support.process import run_mta
from tests.support.sink import Sink


def down_dsn() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/mta"


def fleet_of(database: str, *stores: str) -> Fleet:
    nodes = tuple(NodeEntry(name=f"node-{i}", smtp=f"127.0.0.1:{2525 + i}",
                            admin=f"http://127.0.0.1:{9325 + i}", store=store)
                  for i, store in enumerate(stores or (down_dsn(),)))
    return Fleet(fleet=FleetSection(database=database), nodes=nodes)


def write_fleet_toml(path: Path, database: str, stores: dict[str, str]) -> Path:
    lines = ["[fleet]", f'database = "{database}"']
    for i, (name, store) in enumerate(stores.items()):
        lines += ["[[nodes]]", f'name = "{name}"', f'smtp = "127.0.0.1:{2525 + i}"',
                  f'admin = "http://127.0.0.1:{9325 + i}"', f'store = "{store}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def mta(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True,
                          timeout=120, check=False)


async def fleet_rows(dsn: str, record_id: object) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM mta_fleet.fleet_audit WHERE record_id = $1", record_id))
    finally:
        await conn.close()


async def test_a_record_waits_in_the_spool_and_is_copied_once_when_the_database_is_back(
    tmp_path: Path, db_dsn: str,
) -> None:
    action = FleetAction("isolate", "node-0", "alice", "seed incident 1", "ok via store",
                         {"deliveries": 3})
    async with FleetAudit.opened(fleet_of(down_dsn()), tmp_path) as audit:
        assert audit.unreachable() is not None
        where = await audit.record(action)
    spool = tmp_path / SPOOL_NAME
    assert where.startswith(f"spool {spool} (fleet database unreachable: ")
    assert len(spool.read_text().splitlines()) == 1

    line = spool.read_text()
    async with FleetAudit.opened(fleet_of(db_dsn), tmp_path) as audit:
        assert audit.unreachable() is None
        listed = await audit.records(None, None, 10)
    assert [(e.source, e.record) for e in listed] == [("fleet", action)]
    assert spool.read_text() == ""
    assert await fleet_rows(db_dsn, action.record_id) == 1

    # A crash after the commit but before the truncation leaves the line spooled: copying
    # it again stores nothing new. A corrupt line is set aside and blocks nothing.
    other = FleetAction("drain", "node-0", "bob", "maintenance", "ok")
    spool.write_text(line + "{not json\n" + json.dumps(other.as_json()) + "\n")
    async with FleetAudit.opened(fleet_of(db_dsn), tmp_path) as audit:
        listed = await audit.records("node-0", None, 10)
    assert [e.record.record_id for e in listed] == [other.record_id, action.record_id]
    assert await fleet_rows(db_dsn, action.record_id) == 1
    assert spool.read_text() == ""
    rejected = (tmp_path / REJECTED_NAME).read_text().splitlines()
    assert len(rejected) == 1 and "{not json" in json.loads(rejected[0])["line"]


async def test_a_spool_that_cannot_be_read_never_keeps_the_database_from_use(
    tmp_path: Path, db_dsn: str,
) -> None:
    (tmp_path / SPOOL_NAME).mkdir()
    action = FleetAction("activate", "node-0", "alice", "back", "ok")
    async with FleetAudit.opened(fleet_of(db_dsn), tmp_path) as audit:
        assert audit.unreachable() is None
        assert await audit.record(action) == "fleet database"
        assert [e.record for e in await audit.records(None, None, 5)] == [action]


async def test_the_fleet_schema_shares_a_database_with_a_node_store(db_dsn: str,
                                                                     tmp_path: Path) -> None:
    async with FleetAudit.opened(fleet_of(db_dsn), tmp_path) as audit:
        assert await audit.record(FleetAction("drain", "n", "o", "r", "ok")) == "fleet database"
    conn = await asyncpg.connect(db_dsn)
    try:
        fleet_versions = await conn.fetch("SELECT version FROM mta_fleet.schema_migrations")
        node_versions = await conn.fetch("SELECT version FROM public.schema_migrations")
    finally:
        await conn.close()
    assert [r["version"] for r in fleet_versions] == [
        m.version for m in available_migrations("mta.fleet")]
    assert sorted(r["version"] for r in node_versions) == [
        m.version for m in available_migrations()]


async def test_without_a_fleet_database_the_audit_uses_a_local_embedded_store(
    tmp_path: Path,
) -> None:
    fleet = fleet_of("")
    action = FleetAction("drain", "node-0", "alice", "laptop fleet", "ok")
    server = EmbeddedPostgres(tmp_path / STORE_DIR)
    try:
        async with FleetAudit.opened(fleet, tmp_path) as audit:
            assert audit.unreachable() is None
            assert await audit.record(action) == "fleet database"
        assert server.postmaster_pid() is None, "this call started it, so it stopped it"

        server.start()
        async with FleetAudit.opened(fleet, tmp_path) as audit:
            assert [e.record for e in await audit.records(None, None, 5)] == [action]
        assert server.postmaster_pid() is not None, "a server it found running keeps running"
    finally:
        server.remove()


async def test_fleet_audit_merges_the_fleet_database_the_spool_and_the_nodes(
    tmp_path: Path, db_dsn: str,
) -> None:
    node_store = fleet_of(db_dsn, db_dsn).nodes[0].model_copy(update={"name": "postal-a"})
    async with open_node_store(node_store) as opened:
        await opened.store.record_audit("queue-resend", "carol", "certainly not sent", "ok",
                                        {"resent": 2})
    stores = {"postal-a": db_dsn, "postal-b": down_dsn()}
    fleet_file = write_fleet_toml(tmp_path / "fleet.toml", db_dsn, stores)
    data_dir = tmp_path / "fleet-data"
    async with FleetAudit.opened(fleet_of(db_dsn), data_dir) as audit:
        await audit.record(FleetAction("isolate", "postal-a", "alice", "sick", "ok",
                                       {"moved": 0}))

    result = mta("fleet", "audit", "--json", "--fleet", str(fleet_file),
                 "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["source"], r["node"], r["action"], r["operator"]) for r in rows} == {
        ("fleet", "postal-a", "isolate", "alice"), ("node", "postal-a", "queue-resend", "carol")}
    assert [r["counts"] for r in rows if r["source"] == "node"] == [{"resent": 2}]
    assert set(rows[0]) == {"time", "node", "source", "action", "operator", "reason",
                            "result", "counts"}
    skipped = [line for line in result.stderr.splitlines() if "postal-b" in line]
    assert len(skipped) == 1 and "unreachable" in skipped[0]

    # The fleet database down: its spool is listed, with the nodes; still exit 0.
    down_file = write_fleet_toml(tmp_path / "down.toml", down_dsn(), stores)
    async with FleetAudit.opened(fleet_of(down_dsn()), data_dir) as audit:
        await audit.record(FleetAction("drain", "postal-b", "bob", "backlog", "ok"))
    result = mta("fleet", "audit", "--fleet", str(down_file), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split("\t") == [
        "time", "node", "source", "action", "operator", "reason", "result", "counts"]
    sources = {tuple(line.split("\t")[1:4]) for line in result.stdout.splitlines()[2:]}
    assert sources == {("postal-b", "spool", "drain"), ("postal-a", "node", "queue-resend")}

    # Nothing readable at all: exit 1.
    result = mta("fleet", "audit", "--node", "postal-b", "--fleet", str(down_file),
                 "--data-dir", str(data_dir))
    assert result.returncode == 1, (result.stdout, result.stderr)


async def test_fleet_audit_lists_a_fleet_action_once_and_keeps_node_only_actions(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port})
    fleet.database = new_database()
    fleet.write()
    data_dir = str(tmp_path / "fleet-data")
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await enqueue_tagged(store, ["m1", "m2", "m3"])
        config = str(fleet.nodes["a"].config_path)
        # A node-only action: an operator's hold on node a (mta queue on that host).
        (first, *_) = await store.deliveries_in_state("queued")
        held = await run_mta("queue", "hold", str(first.id), "--reason", "abuse check",
                             "--operator", "carol", "--config", config)
        assert held.returncode == 0, held.stderr
        # Fleet actions, each also written into a's audit table: a mode change (through
        # its store, a's daemon is down) and a reroute run.
        isolated = await fleet.fleet("isolate", "a", "--reason", "seed 1 drill",
                                     "--operator", "alice", "--data-dir", data_dir)
        assert isolated.returncode == 0, isolated.stderr
        await fleet.start("b")
        moved = await fleet.fleet("reroute", "a", "--to", "b", "--reason", "empty it",
                                  "--operator", "alice", "--data-dir", data_dir)
        assert moved.returncode == 0, moved.stderr
        # Another node-only action: a mode the node took without the fleet.
        await store.set_node_mode("a", "draining", "local check", "dave")
        on_node = [r.action for r in await store.audit_records()]
        assert on_node == ["mode:draining", "reroute", "mode:isolated", "hold"]

        listed = await fleet.fleet("audit", "--json", "--data-dir", data_dir)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["source"], r["node"], r["action"], r["operator"]) for r in rows] == [
            ("node", "a", "mode:draining", "dave"),
            ("fleet+node", "a", "reroute", "alice"),
            ("fleet+node", "a", "isolate", "alice"),
            ("node", "a", "hold", "carol"),
        ], "each action once, the node's own ones too"
        assert rows[1]["counts"]["moved"] == 2 and rows[1]["reason"] == "empty it"
        assert rows[2]["result"] == "ok via store"

        table = await fleet.fleet("audit", "--node", "a", "--data-dir", data_dir)
        assert table.returncode == 0, table.stderr
        actions = [line.split("\t")[3] for line in table.stdout.splitlines()[2:]]
        assert actions == ["mode:draining", "reroute", "isolate", "hold"]
    finally:
        await store.close()
        await fleet.close()


def test_fleet_audit_refuses_a_bad_since(tmp_path: Path) -> None:
    fleet_file = write_fleet_toml(tmp_path / "fleet.toml", down_dsn(), {"a": down_dsn()})
    result = mta("fleet", "audit", "--since", "yesterday", "--fleet", str(fleet_file),
                 "--data-dir", str(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--since" in result.stderr and "Traceback" not in result.stderr


def node_config(path: Path, name: str, dsn: str, workers: int) -> Path:
    path.write_text(f'[node]\nname = "{name}"\nworkers = {workers}\nintake_db_slots = 4\n'
                    f'data_dir = "{path.parent / name}"\n[database]\ndsn = "{dsn}"\n')
    return path


def config_fleet(tmp_path: Path, dsn: str, workers: int) -> Path:
    lines = []
    for i, name in enumerate(("postal-a", "postal-b")):
        config = node_config(tmp_path / f"{name}.toml", name, dsn, workers)
        lines += ["[[nodes]]", f'name = "{name}"', f'smtp = "127.0.0.1:{2525 + i}"',
                  f'admin = "http://127.0.0.1:{9325 + i}"', f'config = "{config}"']
    path = tmp_path / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def server_available(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        max_connections = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    finally:
        await conn.close()
    return max_connections - reserved - 10


async def test_config_check_sums_the_nodes_that_share_a_server(tmp_path: Path,
                                                               db_dsn: str) -> None:
    available = await server_available(db_dsn)
    # Each node alone fits (mta config check would pass), both together do not.
    workers = available * 6 // 10
    over = mta("fleet", "config-check", "--fleet", str(config_fleet(tmp_path, db_dsn, workers)))
    assert over.returncode == 2, (over.stdout, over.stderr)
    assert len(over.stderr.strip().splitlines()) == 1
    total = 2 * (workers + 4 + 2)
    assert "postal-a, postal-b on " in over.stderr
    assert f"{total} exceeds {available} available" in over.stderr
    assert "in use now (information only)" in over.stdout

    under = mta("fleet", "config-check", "--fleet", str(config_fleet(tmp_path, db_dsn, 2)))
    assert under.returncode == 0, (under.stdout, under.stderr)
    assert "need 16 connections, fits" in under.stdout


def test_config_check_needs_each_nodes_config_and_a_reachable_server(tmp_path: Path,
                                                                     db_dsn: str) -> None:
    store_only = write_fleet_toml(tmp_path / "store.toml", "", {"postal-c": db_dsn})
    result = mta("fleet", "config-check", "--fleet", str(store_only))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "postal-c" in result.stderr and "give each its config" in result.stderr

    down = config_fleet(tmp_path, down_dsn(), 2)
    result = mta("fleet", "config-check", "--fleet", str(down))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "unreachable" in result.stderr
