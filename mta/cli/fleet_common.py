"""What the ``mta fleet`` commands share: the app, its options and the inventory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mta.admin.logs import configure_logging
from mta.cli.common import fail
from mta.errors import ConfigError
from mta.fleet.inventory import Fleet, fleet_file, load_fleet

fleet_app = typer.Typer(no_args_is_help=True,
                        help="Act on the fleet in fleet.toml: status, modes, reroute, audit.")


@fleet_app.callback()
def _logs_to_stderr() -> None:
    """Warnings and errors go to standard error: standard output is the command's answer."""
    configure_logging("warning", "console", stream=sys.stderr)


FleetOption = Annotated[
    Path | None,
    typer.Option("--fleet", "-f", help="The inventory (default: $MTA_FLEET, else ./fleet.toml)."),
]
DataDirOption = Annotated[
    Path,
    typer.Option("--data-dir", help="Where the local fleet store lives when fleet.database "
                                    "is not set (and the audit spool)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON for scripts.")]
NodeArgument = Annotated[str, typer.Argument(help="A node's name in fleet.toml.")]
OperatorOption = Annotated[
    str | None, typer.Option("--operator", help="Who (default: $SUDO_USER or the login name).")
]
ReasonOption = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")]
#: ``--data-dir`` when it is not given.
DEFAULT_DATA_DIR = Path("./fleet-data")


def inventory(path: Path | None) -> Fleet:
    """The fleet in ``--fleet`` (or its defaults); a mistake exits 2 with one line."""
    try:
        return load_fleet(fleet_file(path))
    except ConfigError as exc:
        fail(f"fleet: {exc}")
