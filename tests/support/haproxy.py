"""A real HAProxy in front of test nodes: a config from a template, its stats socket.

The template keeps the choices of ``deploy/haproxy/haproxy.cfg`` (TCP mode, leastconn,
``option httpchk GET /readyz`` on each admin port, ``send-proxy-v2``, fall 2 rise 2) with
ports the OS picked, the stats socket in the test's directory and a short ``inter``.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.nodes import free_port, wait_for

#: Debian's package puts it in /usr/sbin, which a non-root PATH may lack.
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

TEMPLATE = """\
global
    stats socket {socket} mode 600 level admin
    stats timeout 30s

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    timeout queue 10s
    retries 2
    option redispatch

frontend submission
    bind 127.0.0.1:{port}
    default_backend mta_nodes

backend mta_nodes
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter {inter_ms}ms fall 2 rise 2 send-proxy-v2
{servers}
"""


@dataclass(frozen=True)
class Backend:
    """One node as HAProxy sees it: a server name, its SMTP and admin ports."""

    name: str
    smtp_port: int
    admin_port: int


@dataclass
class HAProxy:
    """``haproxy -db -f haproxy.cfg`` in a subprocess, on a port picked for it."""

    workdir: Path
    backends: list[Backend]
    inter_ms: int = 200
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        """The stats socket (level admin)."""
        return self.workdir / "haproxy.sock"

    @property
    def config_path(self) -> Path:
        """The generated config file."""
        return self.workdir / "haproxy.cfg"

    def render(self) -> str:
        """The config for these backends."""
        servers = "\n".join(
            f"    server {b.name} 127.0.0.1:{b.smtp_port} check port {b.admin_port}"
            for b in self.backends)
        return TEMPLATE.format(socket=self.socket_path, port=self.port,
                               inter_ms=self.inter_ms, servers=servers)

    def spawn(self) -> None:
        """Write the config and start HAProxy in the foreground (``-db``)."""
        assert Path(HAPROXY).exists(), "haproxy is not installed: apt-get install -y haproxy"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render(), encoding="utf-8")
        with (self.workdir / "haproxy.log").open("wb") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    async def start(self, timeout: float = 15.0) -> None:
        """Spawn HAProxy and wait until every server passed its health check."""
        self.spawn()
        await wait_for(self._all_checked_up, timeout, interval=0.05)

    async def _all_checked_up(self) -> bool:
        assert self.process is not None and self.process.poll() is None, \
            (self.workdir / "haproxy.log").read_text(errors="replace")
        if not self.socket_path.exists():
            return False
        try:
            rows = await self.show_stat()
        except OSError:
            return False
        servers = [row for row in rows if row["svname"] in {b.name for b in self.backends}]
        return len(servers) == len(self.backends) and all(
            row["status"] == "UP" and row["check_status"] == "L7OK" for row in servers)

    async def command(self, line: str) -> str:
        """One command on the stats socket and its whole answer."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.socket_path)), 5)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 5)).decode()
        finally:
            writer.close()

    async def show_stat(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per proxy or server line (keys from its CSV header)."""
        text = await self.command("show stat")
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines and lines[0].startswith("# "), text[:200]
        return list(csv.DictReader([lines[0][2:], *lines[1:]]))

    async def status(self, server: str) -> str:
        """The ``status`` column of ``server`` (UP, DOWN, "UP 1/2", …)."""
        for row in await self.show_stat():
            if row["pxname"] == "mta_nodes" and row["svname"] == server:
                return row["status"]
        raise AssertionError(f"{server} is not in show stat")

    async def wait_status(self, server: str, status: str, timeout: float = 10.0) -> None:
        """Wait until ``server``'s status is exactly ``status`` (a deadline, not a sleep)."""
        async def reached() -> bool:
            return await self.status(server) == status

        await wait_for(reached, timeout, interval=0.05)

    async def close(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL) and reap it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await wait_for(lambda: process.poll() is not None, 5)
        except AssertionError:
            process.kill()
            await wait_for(lambda: process.poll() is not None, 5)
