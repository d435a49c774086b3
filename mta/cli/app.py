"""The ``mta`` command line: serve | config check | db migrate | user hash | queue …"""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from mta.admin.logs import configure_logging
from mta.cli.queue import queue_app
from mta.config import (
    Settings,
    connection_budget,
    load_settings,
    memory_bound_bytes,
)
from mta.errors import BudgetExceeded, ConfigError, StoreUnavailable, UnsafeDatabase
from mta.intake.auth import hash_password
from mta.queue.preflight import preflight

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mta-fleet: a mail transfer agent node with a Postgres-backed queue.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and check configuration.")
db_app = typer.Typer(no_args_is_help=True, help="Manage the store's schema.")
user_app = typer.Typer(no_args_is_help=True, help="Manage submission credentials.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(queue_app, name="queue")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Node config file (TOML). MTA_… variables override it."),
]
stdout = Console(soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2: the operator can fix the input)."""
    print(f"mta: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(f"config: {exc}")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Start a node: check the config and budget, migrate, and serve SMTP."""
    from mta.supervisor import serve as run_serve

    settings = _load(config)
    configure_logging(settings.log.level, settings.log.format)
    try:
        code = run_serve(settings)
    except (BudgetExceeded, UnsafeDatabase) as exc:
        fail(str(exc))
    except StoreUnavailable as exc:
        fail(str(exc).splitlines()[0], code=1)
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}", code=1)
    raise typer.Exit(code)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _settings_table(settings: Settings) -> Table:
    table = Table("key", "value", title="Effective settings", show_lines=False)
    dumped = settings.model_dump(mode="json")
    users = dumped.pop("users")
    for section, values in dumped.items():
        for key, value in values.items():
            if section == "database" and key == "dsn":
                value = _mask_dsn(value) or "(embedded)"
            table.add_row(f"{section}.{key}", str(value))
    table.add_row("users", ", ".join(user["name"] for user in users) or "(none)")
    return table


def _mask_dsn(dsn: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Print effective settings, the connection budget and memory bound; refuse violations."""
    settings = _load(config)
    stdout.print(_settings_table(settings))
    budget = connection_budget(settings)
    stdout.print(
        f"connection budget: pool {budget.pool_size} per process = workers "
        f"{settings.node.workers} + intake_db_slots {settings.node.intake_db_slots} + 2; "
        f"{budget.processes} process(es) -> {budget.node_total} connections"
    )
    delivery = (f" + workers {settings.node.workers} x 2 copies x max_message_size"
                if settings.delivery.enabled else "")
    stdout.print(
        f"memory bound per process: {_human(memory_bound_bytes(settings))} "
        f"(data_concurrency {settings.smtp.data_concurrency} x 4 copies x max_message_size "
        f"{_human(int(settings.smtp.max_message_size))}{delivery} + base)"
    )
    if not settings.database.dsn:
        from mta.supervisor import embedded_server

        server = embedded_server(settings)
        stdout.print(
            f"database: embedded in {server.base_dir}, started with max_connections "
            f"{server.settings.max_connections}, which fits the budget"
        )
        return
    try:
        report = asyncio.run(preflight(settings, settings.database.dsn, embedded=False))
    except StoreUnavailable as exc:
        stdout.print(f"database: unreachable ({str(exc).splitlines()[0]}); budget not checked")
        return
    except (BudgetExceeded, UnsafeDatabase) as exc:
        fail(str(exc))
    limits = report.server.limits
    stdout.print(
        f"database: max_connections {limits.max_connections}, superuser_reserved "
        f"{limits.superuser_reserved}, reserve {settings.database.connections_reserve} -> "
        f"{report.available} available; {limits.in_use} in use now (information only); "
        f"budget {budget.node_total} fits"
    )


@db_app.command("migrate")
def db_migrate(config: ConfigOption = None) -> None:
    """Apply pending schema migrations (``mta serve`` also does this at start)."""
    from mta.queue import migrate_dsn
    from mta.supervisor import open_database

    settings = _load(config)
    try:
        database = open_database(settings)
        try:
            applied = asyncio.run(migrate_dsn(database.dsn, settings.database.connect_timeout))
        finally:
            database.close()
    except StoreUnavailable as exc:
        fail(str(exc).splitlines()[0], code=1)
    stdout.print(f"applied migrations: {applied}" if applied else "schema is up to date")


@user_app.command("hash")
def user_hash(
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Print a scrypt hash for a ``[[users]]`` entry's ``password_hash``."""
    if password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            fail("passwords do not match")
    if not password:
        fail("empty password")
    print(hash_password(password))


def main() -> None:
    """Console-script entry point."""
    app()
