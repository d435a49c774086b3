"""deploy/prometheus: promtool checks the rules and the scrape config, and unit-tests
each alert on series shaped like a real outage: once where it fires, once where it
stays quiet (issue 12)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.alert_rules import RULES, SCRAPE_CONFIG, promtool, read_rules, render

NODE = {"job": "mta-node", "instance": "postal-a:9325"}
CONTROLLER = {"job": "mta-controller"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One input series of the node target, ``labels`` added."""
    selector = ",".join(f'{k}="{v}"' for k, v in {**NODE, **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


@dataclass
class Case:
    """Series, and what ``alert`` is at ``at``: firing with ``fires`` labels, or quiet."""

    alert: str
    at: str
    inputs: list[dict[str, str]]
    fires: list[dict[str, str]] = field(default_factory=list)

    def promtool_test(self, rules: dict[str, Any]) -> dict[str, Any]:
        rule = rules[self.alert]
        expected = [{"exp_labels": {**labels, "severity": rule.severity},
                     "exp_annotations": {
                         "summary": render(rule.summary, labels),
                         "description": render(rule.description, labels)}}
                    for labels in self.fires]
        return {"interval": "1m", "input_series": self.inputs, "alert_rule_test": [
            {"eval_time": self.at, "alertname": self.alert, "exp_alerts": expected}]}


def up(values: str) -> dict[str, str]:
    return series("up", values)


CASES = [
    Case("MtaWatchdog", "1m", [up("1x5")], [{}]),
    # The node process dies at minute 3: down for a minute, then it fires.
    Case("MtaNodeDown", "6m", [up("1 1 1 0 0 0 0")], [NODE]),
    Case("MtaNodeDown", "6m", [up("1 1 1 0 1 1 1")]),  # one failed scrape
    Case("MtaNodeAbsent", "3m", [series("mta_store_up", "1x5")], [{"job": "mta-node"}]),
    Case("MtaNodeAbsent", "3m", [up("1x5")]),
    # The event loop stops beating at 180 s (the value is its unix time).
    Case("MtaHeartbeatStale", "8m",
         [series("mta_heartbeat_timestamp_seconds", "0+60x3 180x10")], [NODE]),
    Case("MtaHeartbeatStale", "8m", [series("mta_heartbeat_timestamp_seconds", "0+60x10")]),
    Case("MtaStoreDown", "5m", [series("mta_store_up", "1 1 0 0 0 0")], [NODE]),
    Case("MtaStoreDown", "5m", [series("mta_store_up", "1 1 0 1 1 1")]),  # a blip
    # Every slot wait times out from minute 5 (the store's server is out of connections).
    Case("MtaPoolSaturated", "12m", [
        series("mta_store_pool_acquire_timeouts_total", "0x5 0+10x10", share="intake"),
        series("mta_store_pool_connections_in_use", "3x15"),
        series("mta_store_pool_max_connections", "10x15")], [NODE]),
    Case("MtaPoolSaturated", "12m", [
        series("mta_store_pool_acquire_timeouts_total", "0x15", share="intake"),
        series("mta_store_pool_connections_in_use", "3x15"),
        series("mta_store_pool_max_connections", "10x15")]),
    # The store goes away at minute 5: every message is answered 451, none accepted.
    Case("MtaIntakeRefusing", "15m", [
        series("mta_intake_rejected_total", "0x5 0+60x15", reason="store_unavailable"),
        series("mta_intake_accepted_messages_total", "0+600x5 3000x15")], [NODE]),
    Case("MtaIntakeRefusing", "15m", [
        series("mta_intake_rejected_total", "0+6x20", reason="store_unavailable"),
        series("mta_intake_accepted_messages_total", "0+600x20")]),
    # The claim loop stops at minute 5 on an active node: its heartbeat goes stale.
    Case("MtaWorkersStalled", "10m", [
        series("mta_delivery_heartbeat_timestamp_seconds", "0+60x5 300x10"),
        series("mta_queue_due_lag_seconds", "0x15"),
        series("mta_node_mode", "1x15", mode="active")], [NODE]),
    # Due mail waits longer and longer (the seed's "no cron jobs for five minutes").
    Case("MtaWorkersStalled", "13m", [
        series("mta_delivery_heartbeat_timestamp_seconds", "0+60x15"),
        series("mta_queue_due_lag_seconds", "0x5 60+60x10"),
        series("mta_node_mode", "1x15", mode="active")], [NODE]),
    # The same lag on an isolated node is on purpose; a node without delivery has no beat.
    Case("MtaWorkersStalled", "13m", [
        series("mta_delivery_heartbeat_timestamp_seconds", "0+60x5 300x10"),
        series("mta_queue_due_lag_seconds", "0x5 60+60x10"),
        series("mta_node_mode", "0x15", mode="active"),
        series("mta_node_mode", "1x15", mode="isolated")]),
    Case("MtaWorkersStalled", "13m", [  # a draining node: MtaNodeNotActive covers it
        series("mta_delivery_heartbeat_timestamp_seconds", "0+60x5 300x10"),
        series("mta_queue_due_lag_seconds", "0x15"),
        series("mta_node_mode", "0x15", mode="active"),
        series("mta_node_mode", "1x15", mode="draining")]),
    Case("MtaWorkersStalled", "13m", [
        series("mta_delivery_heartbeat_timestamp_seconds", "0x15"),
        series("mta_queue_due_lag_seconds", "0x15"),
        series("mta_node_mode", "1x15", mode="active")]),
    Case("MtaQueueAgeHigh", "30m",
         [series("mta_queue_oldest_message_age_seconds", "21000+60x40")], [NODE]),
    Case("MtaQueueAgeHigh", "30m", [series("mta_queue_oldest_message_age_seconds", "0+60x40")]),
    # A reply to the dot is lost: two deliveries become uncertain.
    Case("MtaUncertainDeliveries", "4m",
         [series("mta_queue_deliveries", "0 0 2 2 2", state="uncertain")],
         [{**NODE, "state": "uncertain"}]),
    Case("MtaUncertainDeliveries", "4m",
         [series("mta_queue_deliveries", "0x5", state="uncertain")]),
    Case("MtaHeldDeliveries", "7m", [series("mta_queue_deliveries", "0 1x10", state="held")],
         [{**NODE, "state": "held"}]),
    Case("MtaHeldDeliveries", "7m",
         [series("mta_queue_deliveries", "0 1 0x8", state="held")]),  # released at once
    Case("MtaBounceSpike", "20m", [
        series("mta_delivery_outcomes_total", "0+30x30", outcome="failed", destination="mx.a"),
        series("mta_delivery_outcomes_total", "0+30x30", outcome="delivered",
               destination="mx.a")], [NODE]),
    Case("MtaBounceSpike", "20m", [
        series("mta_delivery_outcomes_total", "0+3x30", outcome="failed", destination="mx.a"),
        series("mta_delivery_outcomes_total", "0+300x30", outcome="delivered",
               destination="mx.a")]),
    # One destination defers nine attempts in ten; another is healthy.
    Case("MtaDeferRateHigh", "30m", [
        series("mta_delivery_outcomes_total", "0+54x40", outcome="deferred",
               destination="mx.slow.example"),
        series("mta_delivery_outcomes_total", "0+6x40", outcome="delivered",
               destination="mx.slow.example"),
        series("mta_delivery_outcomes_total", "0+60x40", outcome="delivered",
               destination="mx.ok.example")], [{"destination": "mx.slow.example"}]),
    Case("MtaDeferRateHigh", "30m", [
        series("mta_delivery_outcomes_total", "0+6x40", outcome="deferred",
               destination="mx.slow.example"),
        series("mta_delivery_outcomes_total", "0+54x40", outcome="delivered",
               destination="mx.slow.example")]),
    Case("MtaDedupUnavailable", "5m",
         [series("mta_dedup_unavailable_total", "0 0 0 5 5 5", step="check")],
         [{**NODE, "step": "check"}]),
    Case("MtaDedupUnavailable", "5m",
         [series("mta_dedup_unavailable_total", "0x5", step="check")]),
    Case("MtaJournalDown", "4m", [series("mta_journal_up", "1 1 0 0 0")], [NODE]),
    Case("MtaJournalDown", "4m", [series("mta_journal_up", "1x5")]),
    # The store is down: outcomes pile up in the journal.
    Case("MtaJournalBacklog", "25m", [series("mta_journal_backlog_records", "0+20x30")],
         [NODE]),
    Case("MtaJournalBacklog", "25m", [series("mta_journal_backlog_records", "0+2x30")]),
    Case("MtaRecordsSetAside", "3m",
         [series("mta_records_set_aside_total", "0 0 1 1 1", source="settlement")],
         [{**NODE, "source": "settlement"}]),
    Case("MtaRecordsSetAside", "3m",
         [series("mta_records_set_aside_total", "0x5", source="settlement")]),
    Case("MtaTaskFailing", "10m",
         [series("mta_task_failures_total", "0+1x20", task="queue-stats")],
         [{**NODE, "task": "queue-stats"}]),
    Case("MtaTaskFailing", "10m",
         [series("mta_task_failures_total", "0 0 1x20", task="queue-stats")]),
    Case("MtaEmbeddedStoreRestarts", "3m",
         [series("mta_embedded_store_restarts_total", "0 0 1 1")], [NODE]),
    Case("MtaEmbeddedStoreRestarts", "3m",
         [series("mta_embedded_store_restarts_total", "0x5")]),
    # Expiry 10 days after the epoch, evaluated just after it: inside the 14 days.
    Case("MtaTlsCertExpiring", "70m", [series(
        "mta_tls_certificate_expiry_timestamp_seconds", "864000x80", listener="smtp")],
         [{**NODE, "listener": "smtp"}]),
    Case("MtaTlsCertExpiring", "70m", [series(
        "mta_tls_certificate_expiry_timestamp_seconds", "2592000x80", listener="smtp")]),
    Case("MtaNodeNotActive", "35m", [
        series("mta_node_mode", "1x40", mode="isolated"),
        series("mta_node_mode", "0x40", mode="active"),
        series("mta_node_info", "1x40", node="postal-a", version="0.1.0")],
         [{"job": "mta-node", "node": "postal-a", "mode": "isolated"}]),
    Case("MtaNodeNotActive", "35m", [
        series("mta_node_mode", "1x10 0x30", mode="isolated"),
        series("mta_node_mode", "0x10 1x30", mode="active"),
        series("mta_node_info", "1x40", node="postal-a", version="0.1.0")]),
    # The leader dies at minute 5 and the standby never takes over.
    Case("MtaControllerNoLeader", "12m", [
        {"series": 'mta_controller_leader{job="mta-controller",instance="c1"}',
         "values": "1x5 0x20"},
        {"series": 'mta_controller_leader{job="mta-controller",instance="c2"}',
         "values": "0x25"}], [{}]),
    Case("MtaControllerNoLeader", "12m", [up("1x15")], [{}]),  # no controller scraped
    Case("MtaControllerNoLeader", "12m", [
        {"series": 'mta_controller_leader{job="mta-controller",instance="c1"}',
         "values": "1x5 0x20"},
        {"series": 'mta_controller_leader{job="mta-controller",instance="c2"}',
         "values": "0x6 1x20"}]),  # the standby takes over within the 5 minutes
]


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", str(SCRAPE_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_rule_has_a_summary_a_runbook_command_and_a_severity() -> None:
    rules = read_rules()
    assert len(rules) >= 22
    for rule in rules.values():
        assert rule.summary and rule.severity in ("none", "warning", "critical"), rule
        if rule.name != "MtaWatchdog":
            assert "`mta " in rule.description or "`kill " in rule.description, rule


def test_each_alert_fires_on_its_outage_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    rules = read_rules()
    firing = {case.alert for case in CASES if case.fires}
    quiet = {case.alert for case in CASES if not case.fires}
    assert firing == set(rules), set(rules) ^ firing
    assert quiet == set(rules) - {"MtaWatchdog"}, (set(rules) - {"MtaWatchdog"}) ^ quiet
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
             "tests": [case.promtool_test(rules) for case in CASES]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(json.dumps(tests, indent=1), encoding="utf-8")  # JSON is YAML
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
