"""What every command group shares: the ``--config`` option, loading it, one-line errors."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from mta.config import Settings, load_settings
from mta.errors import ConfigError

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Node config file (TOML). MTA_… variables override it."),
]
#: Standard output for people (tables) and scripts (plain lines when piped). No markup,
#: emoji codes or highlighting: what is shown may quote remote servers and clients.
console = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2: the operator can fix the input; 1: the
    operation failed)."""
    print(f"mta: {message}", file=sys.stderr)
    raise typer.Exit(code)


def load(config: Path | None) -> Settings:
    """The node settings from ``config`` and the environment; a mistake exits 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(f"config: {exc}")


def operator_name(given: str | None) -> str:
    """``--operator``, else ``$SUDO_USER``, else the login name: who the audit names."""
    return given or os.environ.get("SUDO_USER") or getpass.getuser()


def print_rows(title: str, header: list[str], lines: list[list[str]]) -> None:
    """A table on a terminal; tab-separated lines with a header when piped (for scripts)."""
    if not console.is_terminal:
        print(f"# {title}")
        for line in [header, *lines]:
            print("\t".join(field.replace("\t", " ") for field in line))
        return
    table = Table(*header, title=title)
    for line in lines:
        table.add_row(*line)
    console.print(table)
