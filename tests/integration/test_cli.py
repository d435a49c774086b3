"""The operator's commands: one clear line and exit 2 for mistakes, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg

from mta.intake.auth import verify_password


def mta(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "mta", *args], input=stdin, capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})}, check=False,
    )


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_config_check_prints_budget_and_memory_bound(tmp_path: Path, db_dsn: str) -> None:
    path = config_file(tmp_path, f"""
[node]
workers = 4
intake_db_slots = 3
processes = 2
[database]
dsn = "{db_dsn}"
[smtp]
data_concurrency = 2
max_message_size = "1MiB"
[admin]
token = "s3cret-admin-token"
""")
    result = mta("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "s3cret-admin-token" not in result.stdout, "admin tokens are never printed"
    assert "(1 token(s), not shown)" in result.stdout
    assert "pool 9 per process" in result.stdout
    assert "2 process(es) -> 18 connections" in result.stdout
    assert "memory bound per process" in result.stdout
    assert "in use now (information only)" in result.stdout
    assert "budget 18 fits" in result.stdout
    # max_connections_per_destination is per process: the node's figure is printed.
    assert ("connections per destination: 20 per delivering process x 2 process(es) -> 40"
            in result.stdout)


async def test_config_check_refuses_a_budget_over_max_connections(
    tmp_path: Path, db_dsn: str
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        max_connections = int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()
    path = config_file(tmp_path, f"""
[node]
workers = {max_connections}
[database]
dsn = "{db_dsn}"
""")
    result = mta("config", "check", "--config", str(path))
    assert_one_line_error(result, "connection budget", "exceeds", "max_connections")


def test_config_check_reports_an_unreachable_database_without_failing(tmp_path: Path) -> None:
    path = config_file(tmp_path, """
[database]
dsn = "postgresql://nobody@127.0.0.1:1/none"
connect_timeout = 2
""")
    result = mta("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "database: unreachable" in result.stdout


def test_invalid_config_is_one_line_with_exit_2(tmp_path: Path) -> None:
    for text, needle in [
        ("[smtp]\nmax_recipients = -3\n", "smtp.max_recipients"),
        ("[node]\nworkerz = 3\n", "node.workerz: unknown key"),
        ("[node]\nworkers = 'x'\n", "node.workers"),
        ("[database]\ndsn = 'postgresql://h:port/db'\n", "database.dsn: malformed port"),
        ("[smtp]\ntls_cert_file = '/missing.pem'\ntls_key_file = '/missing.key'\n",
         "smtp.tls_cert_file: file not found"),
        ("[node]\nprocesses = 4\n[admin]\nlisten = '127.0.0.1:65534'\n",
         "admin.listen: node process 3 would serve admin HTTP on port 65537"),
    ]:
        assert_one_line_error(mta("config", "check", "--config", str(config_file(tmp_path, text))),
                              needle)


def test_bad_environment_override_is_one_line(tmp_path: Path) -> None:
    result = mta("config", "check", env={"MTA_SMTP__MAX_SESSIONS": "lots"})
    assert_one_line_error(result, "smtp.max_sessions")


def test_unknown_command_and_option_exit_2() -> None:
    assert mta("frobnicate").returncode == 2
    result = mta("config", "check", "--bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_user_hash_reads_stdin_and_verifies() -> None:
    result = mta("user", "hash", "--password-stdin", stdin="correct horse\n")
    assert result.returncode == 0, result.stderr
    encoded = result.stdout.strip()
    assert verify_password("correct horse", encoded)
    assert not verify_password("wrong", encoded)


def test_user_hash_refuses_an_empty_password() -> None:
    assert_one_line_error(mta("user", "hash", "--password-stdin", stdin="\n"), "empty password")
