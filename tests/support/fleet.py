"""A fleet under test: node subprocesses, each on a database of its own, and fleet.toml."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from mta.config import Settings
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from tests.support.nodes import free_port, wait_for
from tests.support.process import MtaResult, NodeProcess, child_env, run_mta, toml_text

#: The admin token every node of a test fleet accepts.
TOKEN = "fleet-test-token"


@dataclass
class FleetUnderTest:
    """Nodes by name, their databases, and the inventory that lists them."""

    workdir: Path
    nodes: dict[str, NodeProcess]
    dsns: dict[str, str]
    database: str = ""
    extra_entries: list[dict[str, Any]] = field(default_factory=list)
    #: ``[controller]`` keys, and its ``[[controller.rules]]``.
    controller: dict[str, Any] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, workdir: Path, new_database: Callable[[], str],
               routes: Mapping[str, int], **overrides: dict[str, Any]) -> FleetUnderTest:
        """One node per entry of ``routes`` (name: the port every domain is routed to)."""
        nodes: dict[str, NodeProcess] = {}
        dsns: dict[str, str] = {}
        for name, port in routes.items():
            dsns[name] = new_database()
            sections: dict[str, dict[str, Any]] = {
                "node": {"name": name, "mode_poll": 1.0},
                "admin": {"token": TOKEN},
                "delivery": {"enabled": True, "poll_interval": 0.2, "routes": [
                    {"domain": "*", "host": "127.0.0.1", "port": port, "tls": "none"}]},
            }
            for section, values in overrides.items():
                sections.setdefault(section, {}).update(values)
            nodes[name] = NodeProcess.configure(workdir / name, dsns[name], **sections)
            nodes[name].write_config()
        fleet = cls(workdir, nodes, dsns)
        fleet.write()
        return fleet

    @property
    def path(self) -> Path:
        """The inventory file."""
        return self.workdir / "fleet.toml"

    def write(self) -> None:
        """Write fleet.toml: every node by its config file, the fleet database if set."""
        entries = [{"name": name, "smtp": f"127.0.0.1:{node.smtp_port}",
                    "admin": f"http://127.0.0.1:{node.admin_port}", "token": TOKEN,
                    "config": str(node.config_path)} for name, node in self.nodes.items()]
        sections: dict[str, Any] = {}
        if self.database:
            sections["fleet"] = {"database": self.database}
        if self.controller:
            sections["controller"] = self.controller
        if self.rules:
            sections["controller.rules"] = self.rules
        sections["nodes"] = entries + self.extra_entries
        self.path.write_text(toml_text(sections), encoding="utf-8")

    async def start(self, *names: str) -> None:
        """Start the named nodes (all by default) and wait until they serve."""
        await asyncio.gather(*(self.nodes[n].start() for n in names or self.nodes))

    async def close(self) -> None:
        """Stop every node that still runs."""
        await asyncio.gather(*(node.close() for node in self.nodes.values()))

    async def fleet(self, *args: str, env: Mapping[str, str] | None = None,
                    timeout: float = 120.0) -> MtaResult:
        """``mta fleet ARGS --fleet fleet.toml`` to completion (``env``: more variables)."""
        return await run_mta("fleet", *args, "--fleet", str(self.path),
                             env=env, timeout=timeout, cwd=self.workdir)

    def settings(self, name: str) -> Settings:
        """Settings to open ``name``'s store from the test."""
        return Settings(node={"name": name, "data_dir": str(self.workdir / name / "data"),
                              "workers": 2, "intake_db_slots": 2},
                        database={"dsn": self.dsns[name]}, delivery={"enabled": False})


async def enqueue_tagged(store: Store, tags: Iterable[str],
                         recipients: tuple[str, ...] = ("user@example.com",)) -> None:
    """One message per tag (its Message-ID is ``<tag@fleet.test>``) to ``recipients``."""
    for tag in tags:
        await store.enqueue(NewMessage(
            id=new_message_id(), mail_from="app@example.org", recipients=list(recipients),
            trace_headers=b"Received: from test\r\n",
            body=f"Message-ID: <{tag}@fleet.test>\r\nSubject: {tag}\r\n\r\nbody {tag}\r\n"
            .encode(),
            client_address="127.0.0.1", helo_name="h", auth_user=None,
            message_id_header=f"<{tag}@fleet.test>"))


@dataclass
class ControllerProcess:
    """``mta fleet controller`` in a subprocess, with its metrics port and its log."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def spawn(cls, fleet: FleetUnderTest, *args: str, name: str = "controller"
              ) -> ControllerProcess:
        """Start a controller on ``fleet`` (``args``: e.g. ``--dry-run``)."""
        port = free_port()
        log = fleet.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mta", "fleet", "controller", *args, "--fleet",
                 str(fleet.path), "--listen", f"127.0.0.1:{port}", "--data-dir",
                 str(fleet.workdir / f"{name}-data")],
                env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=fleet.workdir)
        return cls(process, port, log)

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")

    async def close(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await wait_for(lambda: self.process.poll() is not None, timeout=10)
            except AssertionError:
                self.process.kill()
                await wait_for(lambda: self.process.poll() is not None, timeout=10)


async def fleet_actions(dsn: str) -> list[tuple[str, str, str]]:
    """(action, node, result) of every record in the fleet database, oldest first."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "mta_fleet"})
    try:
        rows = await conn.fetch("SELECT action, node, result FROM fleet_audit ORDER BY id")
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()
    return [(row["action"], row["node"], row["result"]) for row in rows]
