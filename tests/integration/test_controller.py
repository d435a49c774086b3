"""The fleet controller against real node processes: it isolates a node whose figure
stays past a rule, never more than max_nodes_out (counting a person's), leaves a node
alone through its cooldown and never reactivates one; pause, resume and --dry-run; and of
two controllers only the leader acts, the other takes over when it dies, with a newer
term."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from mta.queue import Store
from tests.support.admin import metric
from tests.support.fleet import ControllerProcess, FleetUnderTest, enqueue_tagged, fleet_actions
from tests.support.nodes import free_port, wait_for
from tests.support.sink import Sink

#: Mail that stays pending (its route is a closed port) makes the figure grow.
RULE = {"signal": "oldest_pending_s", "above": 1, "for": "1s", "action": "isolate"}


def backlog_fleet(tmp_path: Path, new_database: Callable[[], str], **controller: object
                  ) -> FleetUnderTest:
    closed = free_port()
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": closed, "b": closed,
                                                           "c": closed})
    fleet.database = new_database()
    fleet.controller = {"poll_interval": "0.3s", "cooldown": "10m", **controller}
    fleet.rules = [RULE]
    fleet.write()
    return fleet


async def modes(fleet: FleetUnderTest, stores: dict[str, Store]) -> dict[str, str]:
    found = {name: await store.node_mode(name) for name, store in stores.items()}
    return {name: mode.mode if mode else "active" for name, mode in found.items()}


async def test_it_isolates_one_sick_node_at_a_time_and_never_brings_one_back(
    tmp_path: Path, new_database: Callable[[], str],
) -> None:
    fleet = backlog_fleet(tmp_path, new_database, max_nodes_out=1)
    stores = {n: await Store.open(fleet.dsns[n], fleet.settings(n)) for n in ("a", "b")}
    controller = None
    try:
        await enqueue_tagged(stores["a"], ["a1"])
        await enqueue_tagged(stores["b"], ["b1"])
        await fleet.start()
        controller = ControllerProcess.spawn(fleet)

        async def one_out() -> bool:
            return sorted((await modes(fleet, stores)).values()) == ["active", "isolated"]

        await wait_for(one_out, timeout=30)
        first = next(n for n, m in (await modes(fleet, stores)).items() if m == "isolated")
        other = "b" if first == "a" else "a"

        async def held_back() -> bool:
            return ("controller:isolate", other, "max_nodes_out") in await fleet_actions(
                fleet.database)

        await wait_for(held_back, timeout=30)
        assert (await modes(fleet, stores))[other] == "active", "max_nodes_out held"
        assert await metric(controller.port, "mta_controller_leader") == 1
        (acted,) = [a for a in await fleet_actions(fleet.database) if a[1] == first]
        assert acted[0] == "controller:isolate" and acted[2].startswith("acted via")
        record = (await stores[first].audit_records())[0]
        assert record.action == "mode:isolated" and record.operator.startswith("controller")

        activated = await fleet.fleet("activate", first, "--reason", "checked: fine")
        assert activated.returncode == 0, activated.stderr

        async def other_out() -> bool:
            return (await modes(fleet, stores))[other] == "isolated"

        await wait_for(other_out, timeout=30)  # one out again: the person's choice counts
        assert (await modes(fleet, stores))[first] == "active", "cooldown: left alone"
    finally:
        if controller is not None:
            await controller.close()
        for store in stores.values():
            await store.close()
        await fleet.close()


async def test_dry_run_pause_and_resume(
    tmp_path: Path, new_database: Callable[[], str],
) -> None:
    fleet = backlog_fleet(tmp_path, new_database, max_nodes_out=3)
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    running: list[ControllerProcess] = []
    try:
        await enqueue_tagged(store, ["p1"])
        await fleet.start()
        paused = await fleet.fleet("controller", "pause", "--reason", "maintenance window",
                                   "--operator", "alice")
        assert paused.returncode == 0, paused.stderr
        running.append(ControllerProcess.spawn(fleet, "--dry-run", name="dry"))
        running.append(ControllerProcess.spawn(fleet, name="real"))

        async def decided() -> bool:
            actions = await fleet_actions(fleet.database)
            return (("controller:isolate", "a", "dry_run") in actions
                    and ("controller:isolate", "a", "paused") in actions)

        await wait_for(decided, timeout=30)
        assert await store.node_mode("a") is None, "neither changed anything"
        assert "controller.held_back" in running[1].text()

        resumed = await fleet.fleet("controller", "resume", "--reason", "window over")
        assert resumed.returncode == 0, resumed.stderr

        async def isolated() -> bool:
            mode = await store.node_mode("a")
            return mode is not None and mode.mode == "isolated"

        await wait_for(isolated, timeout=30)
        actions = [a for a, _, _ in await fleet_actions(fleet.database)]
        assert actions[:2] == ["controller:pause", "controller:isolate"]
        assert "controller:resume" in actions
    finally:
        for controller in running:
            await controller.close()
        await store.close()
        await fleet.close()


async def test_only_the_leader_acts_and_another_takes_over_with_a_newer_term(
    tmp_path: Path, new_database: Callable[[], str],
) -> None:
    fleet = backlog_fleet(tmp_path, new_database, max_nodes_out=1)
    fleet.rules = [{**RULE, "above": 10_000}]  # nothing fires: leadership only
    fleet.write()
    first = ControllerProcess.spawn(fleet, name="first")
    second = None
    try:
        await wait_for(lambda: _leading(first), timeout=20)
        second = ControllerProcess.spawn(fleet, name="second")
        await wait_for(lambda: _answers(second), timeout=20)
        assert await metric(second.port, "mta_controller_leader") == 0
        term = await metric(first.port, "mta_controller_term")
        first.process.send_signal(signal.SIGKILL)
        await wait_for(lambda: _leading(second), timeout=30)
        assert await metric(second.port, "mta_controller_term") == term + 1
    finally:
        await first.close()
        if second is not None:
            await second.close()
        await fleet.close()


async def _leading(controller: ControllerProcess) -> bool:
    return await _answers(controller) and await metric(
        controller.port, "mta_controller_leader") == 1


async def _answers(controller: ControllerProcess) -> bool:
    assert controller.process.poll() is None, controller.text()
    try:
        await metric(controller.port, re.escape("mta_controller_paused"))
    except (OSError, AssertionError):
        return False
    return True


async def test_a_rule_with_reroute_moves_the_isolated_nodes_mail(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port})
    fleet.database = new_database()
    fleet.controller = {"poll_interval": "0.3s", "max_nodes_out": 1}
    fleet.rules = [{**RULE, "reroute": True}]
    fleet.write()
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    controller = None
    try:
        await enqueue_tagged(store, ["r1", "r2", "r3"])
        await fleet.start()
        controller = ControllerProcess.spawn(fleet)
        await sink.wait_for_count(3, timeout=60)
        mode = await store.node_mode("a")
        assert mode is not None and mode.mode == "isolated"
        assert len(await store.deliveries_in_state("rerouted")) == 3
    finally:
        if controller is not None:
            await controller.close()
        await store.close()
        await fleet.close()
