"""TLS on the admin port: with admin.tls_cert_file and admin.tls_key_file, metrics, health
and /v1/* are served over HTTPS only (every process of a node); a config with one of
the two, or with files that do not load together, is one line and exit 2."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from mta.config import Settings
from tests.support.intake import running_node
from tests.support.process import NodeProcess, child_env, write_config

TIMEOUT = aiohttp.ClientTimeout(total=5)


@pytest.fixture
def admin_cert(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 from the test CA, and its key, as files."""
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "admin-cert.pem", tmp_path / "admin-key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that verifies the admin port against the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def https_get(port: int, path: str, context: ssl.SSLContext,
                    token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(
            f"https://127.0.0.1:{port}{path}", headers=headers, ssl=context) as response:
        return response.status, await response.text()


async def plain_get_fails(port: int) -> None:
    """Plain HTTP to the TLS port gets no HTTP answer."""
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
                session.get(f"http://127.0.0.1:{port}/healthz") as response:
            await response.read()


async def test_the_admin_port_serves_https_with_the_configured_certificate(
    make_settings: Callable[..., Settings], admin_cert: tuple[Path, Path], ca: trustme.CA,
) -> None:
    cert_file, key_file = admin_cert
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n",
                                    "tls_cert_file": str(cert_file),
                                    "tls_key_file": str(key_file)})
    tls = settings.admin.tls_context()
    assert tls is not None and tls.minimum_version == ssl.TLSVersion.TLSv1_2
    async with running_node(settings) as node:
        context = trusting(ca)
        assert (await https_get(node.admin_port, "/healthz", context))[0] == 200
        status, body = await https_get(node.admin_port, "/v1/state", context, "t0k3n")
        assert status == 200 and '"mode": "active"' in body
        assert (await https_get(node.admin_port, "/v1/state", context))[0] == 401
        status, metrics = await https_get(node.admin_port, "/metrics", context)
        assert status == 200 and "mta_store_up 1.0" in metrics
        await plain_get_fails(node.admin_port)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await https_get(node.admin_port, "/healthz", ssl.create_default_context())


async def test_every_process_of_a_node_serves_its_admin_port_over_tls(
    tmp_path: Path, db_dsn: str, admin_cert: tuple[Path, Path], ca: trustme.CA,
) -> None:
    cert_file, key_file = admin_cert
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": 2}, admin={
        "token": "t0k3n", "tls_cert_file": str(cert_file), "tls_key_file": str(key_file)})
    await node.start()
    try:
        context = trusting(ca)
        for port in (node.admin_port, node.admin_port + 1):
            assert (await https_get(port, "/healthz", context))[0] == 200, port
            assert (await https_get(port, "/v1/state", context, "t0k3n"))[0] == 200, port
            await plain_get_fails(port)
    finally:
        await node.close()


def mta(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True,
                          text=True, timeout=60, env=child_env(), check=False)


@pytest.mark.parametrize("command", [("config", "check"), ("serve",)])
def test_an_admin_tls_config_that_does_not_load_is_one_line_and_exit_2(
    tmp_path: Path, admin_cert: tuple[Path, Path], ca: trustme.CA, command: tuple[str, ...],
) -> None:
    cert_file, key_file = admin_cert
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    cases = {
        "only the certificate": ({"tls_cert_file": str(cert_file)}, "set together"),
        "only the key": ({"tls_key_file": str(key_file)}, "set together"),
        "a key of another certificate": (
            {"tls_cert_file": str(cert_file), "tls_key_file": str(other_key)},
            "does not load"),
        "a missing file": (
            {"tls_cert_file": str(tmp_path / "nowhere.pem"), "tls_key_file": str(key_file)},
            "cannot read"),
        "a key file that is no key": (
            {"tls_cert_file": str(cert_file), "tls_key_file": str(cert_file)},
            "does not load"),
    }
    for case, (admin, needle) in cases.items():
        path = write_config(tmp_path / "node.toml", {
            "node": {"data_dir": str(tmp_path / "data")}, "admin": admin})
        result = mta(*command, "--config", str(path))
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, case
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "admin" in lines[0] and needle in lines[0], (case, lines)
