"""``mta db migrate``: apply the store's schema migrations."""

from __future__ import annotations

import asyncio

import typer

from mta.cli.common import ConfigOption, console, fail, load
from mta.errors import StoreUnavailable

db_app = typer.Typer(no_args_is_help=True, help="Manage the store's schema.")


@db_app.command("migrate")
def db_migrate(config: ConfigOption = None) -> None:
    """Apply pending schema migrations (``mta serve`` also does this at start)."""
    from mta.queue import migrate_dsn
    from mta.supervisor import open_database

    settings = load(config)
    try:
        database = open_database(settings)
        try:
            applied = asyncio.run(migrate_dsn(database.dsn, settings.database.connect_timeout))
        finally:
            database.close()
    except StoreUnavailable as exc:
        fail(str(exc).splitlines()[0], code=1)
    console.print(f"applied migrations: {applied}" if applied else "schema is up to date")
