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
    STREAM_BODY_BYTES,
    compressed_copy_bytes,
    role_shares,
)
from mta.config.settings import ProcessRole
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


def _role_counts(settings: Settings) -> dict[ProcessRole, int]:
    counts: dict[ProcessRole, int] = {}
    for role in settings.node.roles():
        counts[role] = counts.get(role, 0) + 1
    return counts


def _memory_line(settings: Settings, role: ProcessRole) -> str:
    """The memory bound of one process of ``role``, with what it is made of."""
    size = _human(int(settings.smtp.max_message_size))
    packed = (f" + its compressed copy (under {_human(compressed_copy_bytes(settings))})"
              if compressed_copy_bytes(settings) else "")
    parts = []
    if role != "delivery":
        parts.append(f"data_concurrency {settings.smtp.data_concurrency} x "
                     f"({INTAKE_COPIES_PER_MESSAGE} copy x max_message_size {size} + 1/8 "
                     f"growth + {_human(INTAKE_CHUNK_BYTES)} of chunks + the driver's copy of "
                     f"a body under {_human(STREAM_BODY_BYTES)}{packed})")
    if role != "intake" and settings.delivery.enabled:
        parts.append(f"workers {settings.node.workers} x ({DELIVERY_COPIES_PER_MESSAGE} "
                     f"copies x max_message_size {size}{packed})")
    who = "per process" if role == "both" else f"per {role} process"
    return (f"memory bound {who}: {_human(memory_bound_bytes(settings, role))} "
            f"({' + '.join([*parts, 'base'])})")


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Print effective settings, the connection budget and memory bound; refuse violations."""
    settings = load(config)
    console.print(_settings_table(settings))
    budget = connection_budget(settings)
    for role, count in _role_counts(settings).items():
        shares = role_shares(settings, role)
        parts = " + ".join(f"{name} {shares[name]}" for name in ("delivery", "intake")
                           if name in shares)
        who = "per process" if role == "both" else f"per {role} process"
        console.print(f"connection budget: pool {sum(shares.values())} {who} = {parts} + "
                      f"{FIXED_CONNECTIONS_PER_PROCESS}; x {count}")
    console.print(f"connection budget: {budget.processes} process(es) -> "
                  f"{budget.node_total} connections")
    for role in _role_counts(settings):
        console.print(_memory_line(settings, role))
    per_destination = settings.delivery.max_connections_per_destination
    senders = sum(role != "intake" for role in settings.node.roles())
    console.print(
        f"connections per destination: {per_destination} per delivering process x "
        f"{senders} process(es) -> {per_destination * senders} for the node"
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
