"""Pure parts of the fleet audit and config-check: grouping nodes by database server,
``--since``, the spool's record format and the shared-database guard."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mta.cli.fleet_audit import parse_since
from mta.errors import ConfigError
from mta.fleet.audit import FleetAction, requires_shared_database
from mta.fleet.budget import group_by_server, server_keys
from mta.fleet.inventory import Fleet, FleetSection, NodeEntry


def node(tmp_path: Path, name: str, dsn: str, workers: int = 2, reserve: int = 10) -> NodeEntry:
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[node]\nname = "{name}"\nworkers = {workers}\nintake_db_slots = 3\n'
                      f'data_dir = "{tmp_path / name}"\n[database]\ndsn = "{dsn}"\n'
                      f"connections_reserve = {reserve}\n")
    return NodeEntry(name=name, smtp="127.0.0.1:25", admin="http://127.0.0.1:9325",
                     config=config)


def test_host_names_resolve_to_the_same_server_and_ports_tell_servers_apart(
    tmp_path: Path,
) -> None:
    fleet = Fleet(nodes=(
        node(tmp_path, "a", "postgresql://mta@localhost:5433/a", workers=4, reserve=5),
        node(tmp_path, "b", "postgresql://mta:pw@127.0.0.1:5433/b", reserve=20),
        node(tmp_path, "c", "postgresql://mta@127.0.0.1:5434/c"),
    ))
    groups = group_by_server(fleet)
    assert [[n.node for n in g.nodes] for g in groups] == [["a", "b"], ["c"]]
    shared = groups[0]
    assert [n.total for n in shared.nodes] == [4 + 3 + 2, 2 + 3 + 2]
    assert shared.total == 16
    assert shared.reserve == 20, "the largest reserve of the group"


def test_unix_socket_dsns_group_by_directory_and_port(tmp_path: Path) -> None:
    sockets = tmp_path / "run"
    sockets.mkdir()
    (tmp_path / "link").symlink_to(sockets)
    label, keys = server_keys(f"postgresql://postgres@/x?host={tmp_path / 'link'}&port=5432")
    assert keys == server_keys(f"postgresql://postgres@/y?host={sockets}")[1]
    assert label == f"unix socket {sockets} port 5432"
    assert keys != server_keys(f"postgresql://postgres@/y?host={sockets}&port=5433")[1]


def test_a_node_known_only_by_its_store_dsn_is_not_counted(tmp_path: Path) -> None:
    fleet = Fleet(nodes=(
        node(tmp_path, "a", "postgresql://mta@127.0.0.1:5433/a"),
        NodeEntry(name="b", smtp="127.0.0.1:25", admin="http://127.0.0.1:9326",
                  store="postgresql://mta@127.0.0.1:5433/b"),
    ))
    (group,) = group_by_server(fleet)
    assert group.uncounted == ["b"]
    assert group.total == 7


def test_a_host_that_does_not_resolve_is_reported(tmp_path: Path) -> None:
    fleet = Fleet(nodes=(node(tmp_path, "a", "postgresql://mta@no-such-host.invalid/a"),))
    (group,) = group_by_server(fleet)
    assert group.unresolved is not None and "no-such-host.invalid" in group.unresolved


def test_since_takes_iso_times_and_durations() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-02-28T10:00:00+00:00", now) == datetime(2026, 2, 28, 10,
                                                                     tzinfo=UTC)
    assert parse_since("2026-02-28", now).tzinfo is not None
    for bad in ("yesterday", "5 parsecs", "-3h", ""):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad, now)


def test_a_fleet_action_survives_its_spool_line() -> None:
    action = FleetAction("reroute", "postal-a", "alice", "seed 1", "partial",
                         {"moved": 70000, "skipped_uncertain": 3})
    assert FleetAction.from_json(json.loads(json.dumps(action.as_json()))) == action
    assert action.record_id != FleetAction("x", "n", "o", "r", "ok").record_id


GOOD_LINE = FleetAction("drain", "n", "o", "r", "ok").as_json()


@pytest.mark.parametrize("broken", [
    [], {"action": "drain"}, {**GOOD_LINE, "reason": 3},
    {**GOOD_LINE, "counts": {"moved": "many"}}, {**GOOD_LINE, "counts": {"moved": True}},
    {**GOOD_LINE, "record_id": "not-a-uuid"},
    {**GOOD_LINE, "at": "2026-01-01T00:00"}, {**GOOD_LINE, "at": "soon"},
])
def test_a_broken_spool_line_is_refused(broken: object) -> None:
    FleetAction.from_json(GOOD_LINE)
    with pytest.raises(ValueError):
        FleetAction.from_json(broken)


def test_shared_features_refuse_a_fleet_without_a_database(tmp_path: Path) -> None:
    entry = NodeEntry(name="a", smtp="127.0.0.1:25", admin="http://127.0.0.1:9325",
                      store="postgresql://mta@127.0.0.1/a")
    with pytest.raises(ConfigError, match=r"^the controller needs fleet.database \(a shared"):
        requires_shared_database(Fleet(nodes=(entry,)), "the controller")
    requires_shared_database(
        Fleet(fleet=FleetSection(database="postgresql://fleet@db/fleet"), nodes=(entry,)),
        "the controller")


def test_dedup_connections_count_on_the_fleet_database_server(tmp_path: Path) -> None:
    entry = node(tmp_path, "a", "postgresql://mta@127.0.0.1:5433/a")
    assert entry.config is not None
    entry.config.write_text(entry.config.read_text().replace("[node]", "[node]\nprocesses = 3")
                            + '[dedup]\nenabled = true\nconnections = 2\n'
                            'database = "postgresql://fleet@127.0.0.1:5440/fleet"\n')
    groups = group_by_server(Fleet(nodes=(entry,)))
    assert [[(n.node, n.total) for n in g.nodes] for g in groups] == [
        [("a", 3 * (2 + 3 + 2))], [("a (dedup)", 3 * 2)]]
