"""``mta config check``: the effective settings, the connection budget and the memory bound."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.table import Table

from mta.cli.common import ConfigOption, console, fail, load
from mta.config import Settings, connection_budget, memory_bound_bytes
from mta.config.budget import (
    DELIVERY_COPIES_PER_MESSAGE,
    FIXED_CONNECTIONS_PER_PROCESS,
    INTAKE_CHUNK_BYTES,
    INTAKE_COPIES_PER_MESSAGE,
)
from mta.errors import BudgetExceeded, StoreUnavailable, UnsafeDatabase
from mta.queue.preflight import preflight

config_app = typer.Typer(no_args_is_help=True, help="Inspect and check configuration.")


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
            elif section == "admin" and key == "token":
                value = f"({len(value)} token(s), not shown)"
            table.add_row(f"{section}.{key}", str(value))
    table.add_row("users", ", ".join(user["name"] for user in users) or "(none)")
    return table


def _mask_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Print effective settings, the connection budget and memory bound; refuse violations."""
    settings = load(config)
    console.print(_settings_table(settings))
    budget = connection_budget(settings)
    console.print(
        f"connection budget: pool {budget.pool_size} per process = workers "
        f"{settings.node.workers} + intake_db_slots {settings.node.intake_db_slots} + "
        f"{FIXED_CONNECTIONS_PER_PROCESS}; "
        f"{budget.processes} process(es) -> {budget.node_total} connections"
    )
    delivery = (f" + workers {settings.node.workers} x {DELIVERY_COPIES_PER_MESSAGE} copies "
                "x max_message_size" if settings.delivery.enabled else "")
    console.print(
        f"memory bound per process: {_human(memory_bound_bytes(settings))} "
        f"(data_concurrency {settings.smtp.data_concurrency} x ({INTAKE_COPIES_PER_MESSAGE} "
        f"copy x max_message_size {_human(int(settings.smtp.max_message_size))} + 1/8 "
        f"growth + {_human(INTAKE_CHUNK_BYTES)} of chunks){delivery} + base)"
    )
    per_destination = settings.delivery.max_connections_per_destination
    console.print(
        f"connections per destination: {per_destination} per process x "
        f"{settings.node.processes} process(es) -> {per_destination * settings.node.processes} "
        "for the node"
    )
    if not settings.database.dsn:
        from mta.supervisor import embedded_server

        server = embedded_server(settings)
        console.print(
            f"database: embedded in {server.base_dir}, started with max_connections "
            f"{server.settings.max_connections}, which fits the budget"
        )
        return
    try:
        report = asyncio.run(preflight(settings, settings.database.dsn, embedded=False))
    except StoreUnavailable as exc:
        console.print(f"database: unreachable ({str(exc).splitlines()[0]}); budget not checked")
        return
    except (BudgetExceeded, UnsafeDatabase) as exc:
        fail(str(exc))
    limits = report.server.limits
    console.print(
        f"database: max_connections {limits.max_connections}, superuser_reserved "
        f"{limits.superuser_reserved}, reserve {settings.database.connections_reserve} -> "
        f"{report.available} available; {limits.in_use} in use now (information only); "
        f"budget {budget.node_total} fits"
    )
