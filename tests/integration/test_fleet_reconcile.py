"""``mta fleet reconcile``: through the running daemon's API, or with the daemon down from
the node's own journal (which needs its config in fleet.toml), audited on the node."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mta.queue import Store
from tests.support.fleet import FleetUnderTest
from tests.support.sink import Sink


async def test_reconcile_asks_the_daemon_and_reads_the_journal_when_it_is_down(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port})
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await fleet.start()
        live = await fleet.fleet("reconcile", "a", "--json", "--operator", "carol")
        assert live.returncode == 0, live.stderr
        answer = json.loads(live.stdout)
        assert answer["via"] == "admin API"
        assert answer["changed"] is False
        assert answer["delivered"] == answer["not_delivered"] == answer["uncertain"] == []

        await fleet.close()
        offline = await fleet.fleet("reconcile", "a", "--json")
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout)["via"].startswith("its journal on this host")
        actions = [(r.action, r.operator) for r in await store.audit_records()]
        assert ("reconcile", "carol") in actions
        assert [a for a, _ in actions].count("reconcile") == 2

        fleet.extra_entries.append({"name": "remote", "smtp": "127.0.0.1:1",
                                    "admin": "http://127.0.0.1:1", "token": "x",
                                    "store": fleet.dsns["a"]})
        fleet.write()
        remote = await fleet.fleet("reconcile", "remote")
        assert remote.returncode == 1
        assert "must give its config" in remote.stderr
    finally:
        await store.close()
        await fleet.close()
