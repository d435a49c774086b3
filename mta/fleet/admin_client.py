"""A fleet command's client for one node's admin API (``/readyz``, ``/v1/*``)."""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp

from mta.fleet.inventory import NodeEntry
from mta.mail.text import outside_text

#: Seconds a fleet command waits for a node's admin API before it calls it unreachable.
ADMIN_TIMEOUT_S = 5.0
#: Bytes of an admin answer a fleet command reads at most (an answer is small JSON).
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class AdminUnreachable(Exception):
    """The node's admin API did not answer (refused, timed out, or not HTTP)."""


class AdminRefused(Exception):
    """The node's admin API answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class AdminClient:
    """Calls to one node's admin API with its token; one session per command."""

    def __init__(self, node: NodeEntry, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        self.node = node
        self._token = node.admin_token()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ssl: ssl.SSLContext | bool = True
        if node.admin_ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(node.admin_ca_file))

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``: the status and the JSON answer (any status: /readyz answers 503)."""
        return await self._call("GET", path, None)

    async def text(self, path: str) -> str:
        """GET ``path`` as text (``/metrics``); ``AdminRefused`` unless 200."""
        status, raw = await self._request("GET", path, None)
        if status != 200:
            raise AdminRefused(status, outside_text(raw, limit=300))
        return raw.decode("utf-8", "replace")

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """``method`` ``path`` with a JSON ``body``; ``AdminRefused`` unless 2xx."""
        status, answer = await self._call(method, path, body)
        if not 200 <= status < 300:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise AdminRefused(status, outside_text(str(error or answer), limit=300))
        return answer

    async def _call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        status, raw = await self._request(method, path, body)
        try:
            return status, json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AdminUnreachable(f"{self.node.admin}{path}: the answer is not JSON "
                                   f"(HTTP {status})") from None

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        url = self.node.admin + path
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session, \
                    session.request(method, url, json=body, headers=headers,
                                    ssl=self._ssl) as response:
                return response.status, await response.content.read(MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            reason = outside_text(str(exc) or type(exc).__name__, limit=300)
            raise AdminUnreachable(f"{url}: {reason}") from exc
