"""``mta fleet controller``: run the controller; ``pause`` and ``resume`` its actions."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Annotated

import typer

from mta.cli.common import fail, operator_name
from mta.cli.fleet_common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    FleetOption,
    OperatorOption,
    ReasonOption,
    fleet_app,
    inventory,
)
from mta.config import parse_host_port
from mta.errors import ConfigError
from mta.fleet.audit import (
    FleetAction,
    FleetAudit,
    connect_fleet_database,
    requires_shared_database,
)
from mta.fleet.controller import Controller, serve_metrics
from mta.fleet.inventory import Fleet
from mta.fleet.leader import set_paused
from mta.queue.server import STORE_ERRORS

controller_app = typer.Typer(help="The fleet controller: drains or isolates sick nodes.")
fleet_app.add_typer(controller_app, name="controller")


@controller_app.callback(invoke_without_command=True)
def controller(
    context: typer.Context,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Decide, log and audit, but change nothing.")] = False,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="host:port for its /metrics (default: controller.listen).")] = None,
    fleet_path: FleetOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Watch every node and act by the [controller] policy of fleet.toml until SIGTERM."""
    if context.invoked_subcommand is not None:
        return
    fleet = inventory(fleet_path)
    if not dry_run:
        _shared(fleet, "the controller's leader lock")
    address = listen or fleet.controller.listen
    try:
        host, port = parse_host_port(address)
    except ValueError as exc:
        fail(f"--listen: {exc}")
    identity = f"{socket.gethostname()}:{os.getpid()}"

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        running = Controller(fleet, data_dir, identity, dry_run=dry_run)
        try:
            runner = await serve_metrics(running.metrics, host, port)
        except OSError as exc:
            fail(f"controller: cannot listen on {address}: {exc.strerror}", 1)
        print(f"controller {identity}: watching {len(fleet.nodes)} node(s)"
              f"{' (dry run)' if dry_run else ''}; metrics on {address}",
              file=sys.stderr)
        try:
            await running.run(stop)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def _shared(fleet: Fleet, what: str) -> None:
    try:
        requires_shared_database(fleet, what)
    except ConfigError as exc:
        fail(f"fleet: {exc}")


def _pause_command(paused: bool) -> None:
    def run(reason: ReasonOption, operator: OperatorOption = None,
            fleet_path: FleetOption = None, data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
        fleet = inventory(fleet_path)
        _shared(fleet, "pausing the controller")
        who = operator_name(operator)
        action = "pause" if paused else "resume"

        async def main() -> None:
            conn = await connect_fleet_database(fleet.fleet.database)
            try:
                await set_paused(conn, paused, reason, who)
            finally:
                await conn.close()
            async with FleetAudit.opened(fleet, data_dir) as audit:
                await audit.record(FleetAction(f"controller:{action}", "*", who, reason, "ok"))

        try:
            asyncio.run(main())
        except STORE_ERRORS as exc:
            fail(f"controller {action}: the fleet database did not answer: {exc}", 1)
        print(f"controller actions {'paused' if paused else 'resumed'} fleet-wide")

    run.__doc__ = ("Stop every controller's actions (they keep watching and log what they "
                   "would do)." if paused else "Let the controllers act again.")
    controller_app.command("pause" if paused else "resume")(run)


_pause_command(True)
_pause_command(False)
