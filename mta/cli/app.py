"""The ``mta`` command line: serve | config check | db migrate | user hash | queue … | fleet …"""

from __future__ import annotations

import typer

from mta.cli.config import config_app
from mta.cli.db import db_app
from mta.cli.fleet import fleet_app
from mta.cli.queue import queue_app
from mta.cli.serve import serve
from mta.cli.user import user_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mta-fleet: a mail transfer agent node with a Postgres-backed queue.")
app.command()(serve)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(queue_app, name="queue")
app.add_typer(fleet_app, name="fleet")


def main() -> None:
    """Console-script entry point."""
    app()
