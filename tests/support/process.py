"""Run ``mta`` as a subprocess: a node from a TOML config, its JSON logs, its signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.nodes import free_port, free_port_run, wait_for

#: Seconds a node subprocess may take to import, check, migrate and listen.
START_TIMEOUT_S = 30.0


def toml_text(sections: Mapping[str, Any]) -> str:
    """Render ``{section: {key: value}}`` as TOML; a list of tables becomes ``[[section]]``."""
    lines: list[str] = []
    for section, values in sections.items():
        tables = values if isinstance(values, list) else [values]
        header = f"[[{section}]]" if isinstance(values, list) else f"[{section}]"
        for table in tables:
            lines.append(header)
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) \
            + " }"
    raise TypeError(f"cannot render {value!r} as TOML")


def child_env() -> dict[str, str]:
    """The test's environment without ``MTA_…`` overrides, with unbuffered output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a node config file and return its path."""
    path.write_text(toml_text(sections), encoding="utf-8")
    return path


@dataclass
class MtaResult:
    """A finished ``mta`` command."""

    returncode: int
    stdout: str
    stderr: str


async def run_mta(*args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> MtaResult:
    """Run ``python -m mta ARGS`` to completion within ``timeout`` seconds (``env``: more
    variables on top of the clean test environment)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mta", *args, env={**child_env(), **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"mta {' '.join(args)} did not finish within {timeout}s") from None
    assert process.returncode is not None
    return MtaResult(process.returncode, out.decode(errors="replace"),
                     err.decode(errors="replace"))


@dataclass
class NodeProcess:
    """``mta serve --config F`` in a subprocess, on ports picked for it."""

    workdir: Path
    sections: dict[str, dict[str, Any]]
    smtp_port: int
    admin_port: int
    runs: int = 0
    #: Extra environment for the next runs (for example the fault hook's variables).
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def configure(cls, workdir: Path, dsn: str, **overrides: dict[str, Any]) -> NodeProcess:
        """A node on ``dsn`` with free SMTP and admin ports; sections override by keyword."""
        workdir.mkdir(parents=True, exist_ok=True)
        smtp_port = free_port()
        node = overrides.get("node", {})
        processes = int(node.get("processes", 0)) or (
            int(node.get("intake_processes", 0)) + int(node.get("delivery_processes", 0))) or 1
        admin_port = free_port_run(processes)
        sections: dict[str, dict[str, Any]] = {
            "node": {"name": "proc-node", "data_dir": str(workdir / "data"),
                     "workers": 2, "intake_db_slots": 4},
            "database": {"dsn": dsn, "acquire_timeout": 2.0, "commit_timeout": 5.0},
            "smtp": {"listen": f"127.0.0.1:{smtp_port}", "hostname": "mx.test.invalid"},
            "admission": {"min_free_disk": 0},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "log": {"format": "json"},
            # Tests deliver only where they say (loopback routes), never by default.
            "delivery": {"enabled": False},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        (workdir / "data").mkdir(exist_ok=True)
        return cls(workdir, sections, smtp_port, admin_port)

    @property
    def config_path(self) -> Path:
        """The node's config file."""
        return self.workdir / "node.toml"

    @property
    def log_path(self) -> Path:
        """Standard output (JSON logs) of the current run."""
        return self.workdir / f"node-{self.runs}.log"

    @property
    def pid(self) -> int:
        """The process id of the current run."""
        assert self.process is not None
        return self.process.pid

    def write_config(self) -> None:
        """Write the node's config file from its sections."""
        write_config(self.config_path, self.sections)

    def spawn(self) -> None:
        """Write the config and start a new run of the node."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.write_config()
        self.runs += 1
        with self.log_path.open("wb") as log, \
                (self.workdir / f"node-{self.runs}.err").open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mta", "serve", "--config", str(self.config_path)],
                env={**child_env(), **self.env}, stdin=subprocess.DEVNULL, stdout=log, stderr=err,
                cwd=self.workdir,
            )

    def events(self) -> list[dict[str, Any]]:
        """The JSON log records of the current run so far. A whole line that is not one
        record fails the test: the node's processes share stdout, interleaved lines are
        a bug, and so is any line that is not JSON (an operator's log shipper would drop
        it)."""
        records = []
        text = self.log_path.read_text(errors="replace")
        complete, _, _ = text.rpartition("\n")  # the last line may be being written
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"a log line is not one JSON record: {line!r}") from None
        return records

    def logged(self, event: str) -> bool:
        """True once the current run logged ``event``."""
        return any(record.get("event") == event for record in self.events())

    def stderr_text(self) -> str:
        """Standard error of the current run."""
        return (self.workdir / f"node-{self.runs}.err").read_text(errors="replace")

    def exit_report(self) -> str:
        """The current run's standard error and last log lines, for a failure message."""
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        return "\n".join([self.stderr_text(), *tail])

    async def wait_logged(self, event: str, timeout: float = 10.0) -> None:
        """Wait until the current run logs ``event``; fail early if the process exits."""
        def seen() -> bool:
            if self.logged(event):
                return True
            code = self.process.poll() if self.process is not None else None
            assert code is None, f"node exited ({code}) before {event}: {self.exit_report()}"
            return False

        await wait_for(seen, timeout)

    async def wait_started(self, processes: int = 1, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until ``processes`` node processes of the current run log ``node.started``;
        fail early, with the run's standard error, if the node exits first."""
        def started() -> bool:
            count = sum(1 for record in self.events() if record.get("event") == "node.started")
            if count >= processes:
                return True
            code = self.process.poll() if self.process is not None else None
            assert code is None, \
                f"node exited ({code}) after {count} started: {self.exit_report()}"
            return False

        await wait_for(started, timeout)

    async def start(self) -> None:
        """Spawn a run and wait until every one of its processes serves SMTP."""
        self.spawn()
        await self.wait_started(int(self.sections["node"].get("processes", 1)))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the current run."""
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int:
        """Wait for the current run to exit and return its exit status."""
        assert self.process is not None
        process = self.process
        await wait_for(lambda: process.poll() is not None, timeout)
        assert process.returncode is not None
        return process.returncode

    async def close(self) -> None:
        """Make sure the current run is gone (SIGKILL if it still runs)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            await self.wait_exit(10.0)
