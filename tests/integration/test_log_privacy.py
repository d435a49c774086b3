"""Logs (issue 12): a node run through accept, deliver, defer and fail writes one JSON
record per line, each naming the node, and no local part of an address unless
log.addresses = "full"."""

from __future__ import annotations

from pathlib import Path

from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Faults, Sink

LOCALS = ("alice.sender", "bob.delivered", "carol.deferred", "dave.failed")


async def test_logs_are_json_name_the_node_and_hide_local_parts(
    tmp_path: Path, db_dsn: str, sink: Sink,
) -> None:
    sink.faults = Faults(reject={"carol.deferred@x.example": "451 4.2.0 try later",
                                 "dave.failed@x.example": "550 5.1.1 dave.failed@x.example "
                                                          "unknown"})
    node = NodeProcess.configure(tmp_path / "node", db_dsn, log={"level": "debug"}, delivery={
        "enabled": True, "poll_interval": 0.2,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}]})
    try:
        await node.start()
        await submit_tagged(node.smtp_port, "private", sender="alice.sender@app.example",
                            recipients=[f"{local}@x.example" for local in LOCALS[1:]])

        def settled() -> bool:
            events = [e for e in node.events() if e.get("event") == "delivery.outcome"]
            return len(events) >= 3

        await wait_for(settled, timeout=30)
        records = node.events()
        assert all(record.get("node") == "proc-node" for record in records), records[:3]
        text = node.log_path.read_text()
        for local in LOCALS:
            assert local not in text, f"{local} appears in the log"
        assert "@x.example" in text, "the domain stays"
        (accepted,) = [r for r in records if r.get("event") == "intake.accepted"]
        assert accepted["mail_from"].startswith("h-")
        assert accepted["message_id"] == "<private@test>" and accepted["queue_id"]
        outcomes = [r for r in records if r.get("event") == "delivery.outcome"
                    and r["queue_id"] == accepted["queue_id"]]  # (not the DSN's)
        assert {r["state"] for r in outcomes} == {"delivered", "deferred", "failed"}
        for record in outcomes:  # one event per transition, with what names it
            assert record["message_id"] == "<private@test>"
            assert record["destination"] == "x.example" and record["attempt"] == 1
            assert isinstance(record["delivery_id"], int)
    finally:
        await node.close()
