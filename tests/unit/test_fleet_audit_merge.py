"""``mta fleet audit`` lists a fleet action once though the fleet database and the node's
audit table both hold it (mta/fleet/audit_merge.py ``merge_node_records``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mta.fleet.audit import AuditEntry, FleetAction
from mta.fleet.audit_merge import ECHO_WINDOW, merge_node_records
from mta.queue.records import AuditRecord

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def node_record(n: int, action: str, operator: str, reason: str, at: datetime,
                result: str = "ok", counts: dict[str, int] | None = None,
                node: str = "a") -> AuditRecord:
    return AuditRecord(n, at, node, operator, action, reason, [], [], result, counts or {})


def fleet_entry(action: str, operator: str, reason: str, result: str, at: datetime,
                counts: dict[str, int] | None = None, source: str = "fleet") -> AuditEntry:
    return AuditEntry(source, FleetAction(action, "a", operator, reason, result,
                                          counts or {}, at=at))


def shown(entries: list[AuditEntry]) -> list[tuple[str, str, str]]:
    return [(e.source, e.record.action, e.record.operator) for e in entries]


def test_a_controller_decision_and_its_mode_change_on_the_node_are_one_action() -> None:
    who = "controller c1 term 4"
    entries = [fleet_entry("controller:isolate", who, "db_up below 1 for 30s",
                           "acted via admin API", T0 + timedelta(seconds=1), {"term": 4}),
               # Held back: the controller recorded it, the node never changed.
               fleet_entry("controller:drain", who, "queue_age above 600 for 60s",
                           "cooldown: acted 20s ago", T0 + timedelta(seconds=2))]
    records = [node_record(7, "mode:isolated", who, "controller: db_up below 1 for 30s", T0),
               node_record(8, "mode:draining", who, "controller: queue_age above 600 for 60s",
                           T0 + timedelta(seconds=3))]
    assert shown(merge_node_records(entries, records)) == [
        ("node", "mode:draining", who), ("fleet", "controller:drain", who),
        ("fleet+node", "controller:isolate", who)]


def test_two_like_actions_pair_each_with_its_nearest_node_record() -> None:
    entries = [fleet_entry("drain", "alice", "backlog", "ok via admin API",
                           T0 + timedelta(seconds=s)) for s in (1, 31)]
    records = [node_record(n, "mode:draining", "alice", "backlog", T0 + timedelta(seconds=s))
               for n, s in ((1, 0), (2, 30))]
    merged = merge_node_records(entries, records)
    assert [(e.source, e.record.at) for e in merged] == [
        ("fleet+node", T0 + timedelta(seconds=31)), ("fleet+node", T0 + timedelta(seconds=1))]


def test_records_that_differ_or_lie_apart_stay_separate() -> None:
    entries = [fleet_entry("drain", "alice", "backlog", "failed: unreachable", T0),
               fleet_entry("isolate", "alice", "sick", "ok via store", T0, source="spool"),
               fleet_entry("reroute", "bob", "move", "ok", T0, {"moved": 5})]
    records = [node_record(1, "mode:draining", "alice", "backlog", T0),
               node_record(2, "mode:isolated", "alice", "sick",
                           T0 - ECHO_WINDOW - timedelta(seconds=1)),
               node_record(3, "reroute", "bob", "move", T0, counts={"moved": 4}),
               node_record(4, "hold", "alice", "sick", T0)]
    assert sorted(shown(merge_node_records(entries, records))) == sorted([
        ("fleet", "drain", "alice"), ("spool", "isolate", "alice"), ("fleet", "reroute", "bob"),
        ("node", "mode:draining", "alice"), ("node", "mode:isolated", "alice"),
        ("node", "reroute", "bob"), ("node", "hold", "alice")])


def test_a_merged_record_keeps_the_fleet_result_and_gains_the_node_counts() -> None:
    entries = [fleet_entry("reconcile", "alice", "after a crash", "ok via admin API",
                           T0 + timedelta(seconds=2),
                           {"delivered": 1, "not_delivered": 2, "uncertain": 0})]
    records = [node_record(9, "reconcile", "alice", "after a crash", T0, counts={
        "delivered": 1, "not_delivered": 2, "uncertain": 0, "set_aside": 1})]
    (merged,) = merge_node_records(entries, records)
    assert merged.source == "fleet+node" and merged.record.result == "ok via admin API"
    assert dict(merged.record.counts) == {"delivered": 1, "not_delivered": 2, "uncertain": 0,
                                          "set_aside": 1}
