"""``mta user hash``: a password hash for a ``[[users]]`` entry."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer

from mta.cli.common import fail
from mta.intake.auth import hash_password

user_app = typer.Typer(no_args_is_help=True, help="Manage submission credentials.")


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
