"""Read a node's admin HTTP endpoints: health, readiness and metrics."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=5)


async def admin_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the admin port; returns the status and the body."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def healthz(port: int) -> dict[str, Any]:
    """``/healthz``, which answers 200 whatever the store does (I7)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(f"http://127.0.0.1:{port}/healthz") as response:
        assert response.status == 200, response.status
        body: dict[str, Any] = await response.json()
        return body


async def metric(port: int, name: str) -> float:
    """One unlabelled sample from ``/metrics``."""
    status, text = await admin_get(port, "/metrics")
    assert status == 200, status
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match[1])
