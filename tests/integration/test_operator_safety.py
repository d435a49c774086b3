"""What an operator relies on without looking: unsafe databases are refused at start,
and logs never carry message bodies or credentials."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import asyncpg
import trustme

from mta.intake.auth import hash_password
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess, run_mta, write_config
from tests.support.smtp import RawSMTP


async def test_serve_refuses_a_database_without_synchronous_commit(
    tmp_path: Path, db_dsn: str
) -> None:
    """I1: a server whose commits are not synchronous would lose 250'd mail in a crash."""
    conn = await asyncpg.connect(db_dsn)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    finally:
        await conn.close()
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    write_config(node.config_path, node.sections)
    for command in ("serve", "config"):
        args = ("serve",) if command == "serve" else ("config", "check")
        result = await run_mta(*args, "--config", str(node.config_path))
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "synchronous_commit = off" in lines[0], result.stderr
        assert "allow_unsafe_durability" in lines[0]
        assert "Traceback" not in result.stdout + result.stderr

    node.sections["database"]["allow_unsafe_durability"] = True
    write_config(node.config_path, node.sections)
    result = await run_mta("config", "check", "--config", str(node.config_path))
    assert result.returncode == 0, result


async def test_logs_hold_neither_bodies_nor_passwords(tmp_path: Path, db_dsn: str) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    password = "pw-Zq81-never-logged"
    node = NodeProcess.configure(
        tmp_path / "node", db_dsn,
        smtp={"tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
              "allowed_networks": ["10.0.0.0/8"]},
        log={"level": "debug", "format": "json"},
    )
    node.sections["users"] = [{"name": "app", "password_hash": hash_password(password)}]
    await node.start()
    try:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        client = await RawSMTP.connect(node.smtp_port)
        await client.cmd("EHLO client.test")
        assert (await client.cmd("STARTTLS")).startswith("220")
        await client.writer.start_tls(context, server_hostname="127.0.0.1")
        await client.cmd("EHLO client.test")
        wrong = base64.b64encode(b"\0app\0wrong-" + password.encode()).decode()
        assert (await client.cmd(f"AUTH PLAIN {wrong}")).startswith("535")
        right = base64.b64encode(b"\0app\0" + password.encode()).decode()
        assert (await client.cmd(f"AUTH PLAIN {right}")).startswith("235")
        body = b"Subject: secret\r\n\r\nBODY-MARKER-7d1c payload\r\n"
        reply = await client.submit("a@example.org", ["b@example.com"], body)
        assert reply.startswith("250 2.0.0"), reply
        await client.cmd("QUIT")
        await client.close()
        await node.wait_logged("intake.accepted")
    finally:
        await node.close()
    output = node.log_path.read_text() + node.stderr_text()
    for secret in (password, right, wrong, "BODY-MARKER-7d1c"):
        assert secret not in output, f"{secret!r} appeared in the logs"
    assert "intake.auth_ok" in output and "auth_failed" in output


async def test_every_line_on_stdout_is_one_json_record(tmp_path: Path, db_dsn: str) -> None:
    """Also aiosmtpd's own warnings, which quote what a client sent (``unrecognised: …``):
    a log shipper gets JSON only, with the client's bytes escaped inside it."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, log={"format": "json"})
    await node.start()
    try:
        client = await RawSMTP.connect(node.smtp_port)
        await client.cmd("EHLO client.test")
        assert (await client.cmd("FROBNICATE \x01\x1b[31mred")).startswith("500 ")
        assert (await client.cmd("QUIT")).startswith("221 ")
        await client.close()
        await node.wait_logged("node.started")

        def unrecognised_logged() -> bool:
            return "unrecognised" in node.log_path.read_text(errors="replace")

        await wait_for(unrecognised_logged, timeout=10)
    finally:
        await node.close()
    lines = node.log_path.read_text(errors="replace").splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record, line
