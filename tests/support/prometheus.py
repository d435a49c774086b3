"""A real Prometheus server (Debian's package) on loopback, for the smoke tests."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.alert_rules import INSTALL_HINT, PROMETHEUS, RULES
from tests.support.nodes import free_port, wait_for

TIMEOUT = aiohttp.ClientTimeout(total=5)


def shortened_rules(fors: dict[str, str], default: str = "1s") -> str:
    """alerts.yml with each rule's ``for`` replaced: ``fors[name]``, else ``default``."""
    lines, alert = [], ""
    for line in RULES.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"\s+- alert: (\w+)$", line):
            alert = match[1]
        elif match := re.match(r"(\s+)for: \S+$", line):
            line = f"{match[1]}for: {fors.get(alert, default)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class Prometheus:
    """``prometheus`` scraping ``targets`` (job to host:port list) every second, with
    alerts.yml's rules (``for`` shortened) evaluated every second."""

    workdir: Path
    targets: dict[str, list[str]]
    fors: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def config(self) -> dict[str, Any]:
        """The generated prometheus.yml (as JSON, which is YAML)."""
        return {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                               for job, hosts in self.targets.items()],
        }

    def spawn(self) -> None:
        """Write the config and rules, and start the server."""
        assert Path(PROMETHEUS).exists(), INSTALL_HINT
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "alerts.yml").write_text(shortened_rules(self.fors), encoding="utf-8")
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config()), encoding="utf-8")
        with (self.workdir / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir)

    async def start(self) -> None:
        """Spawn the server and wait until it is ready."""
        self.spawn()

        async def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                async with aiohttp.ClientSession(timeout=TIMEOUT) as http, \
                        http.get(f"{self.url}/-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, timeout=30, interval=0.1)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """What the server wrote so far."""
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    async def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; its ``data`` (asserting status success)."""
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http, \
                http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def alert_states(self, name: str) -> set[str]:
        """The states (``pending``, ``firing``) of alert ``name`` now."""
        alerts = (await self.api("alerts"))["alerts"]
        return {a["state"] for a in alerts if a["labels"]["alertname"] == name}

    def close(self) -> None:
        """Stop the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
