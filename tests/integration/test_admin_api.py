"""The admin API: /v1/* only with a bearer token (401 missing, 403 wrong or none
configured, several accepted for rotation); /v1/state reads and sets the node's mode,
which applies at once and is audited."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mta.config import Settings
from mta.intake import replies
from tests.support.admin import admin_get, metric
from tests.support.delivery import submit_tagged
from tests.support.intake import running_node, store_of
from tests.support.smtp import RawSMTP

TIMEOUT = aiohttp.ClientTimeout(total=5)


async def call(port: int, method: str, path: str, token: str | None = None,
               body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.request(
            method, f"http://127.0.0.1:{port}{path}", headers=headers,
            json=body if raw is None else None, data=raw) as response:
        return response.status, await response.json()


async def test_v1_needs_one_of_the_configured_tokens(
    make_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("from-the-file\n")
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": ["old", "new"],
                                    "token_file": str(token_file)})
    async with running_node(settings) as node:
        port = node.admin_port
        assert (await call(port, "GET", "/v1/state"))[0] == 401
        assert (await call(port, "GET", "/v1/state", "guess"))[0] == 403
        for token in ("old", "new", "from-the-file"):
            status, body = await call(port, "GET", "/v1/state", token)
            assert (status, body["mode"]) == (200, "active"), token
        assert (await admin_get(port, "/healthz"))[0] == 200, "health stays open"
        failures = 'mta_admin_auth_failures_total{reason="%s"}'
        assert await metric(port, re.escape(failures % "missing")) == 1
        assert await metric(port, re.escape(failures % "wrong")) == 1


async def test_a_node_without_a_token_answers_403_on_every_v1_route(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_node(make_settings(admin={"listen": "127.0.0.1:0"})) as node:
        assert (await call(node.admin_port, "GET", "/v1/state", "anything"))[0] == 403
        assert (await call(node.admin_port, "POST", "/v1/state", "anything",
                           {"mode": "isolated", "reason": "x", "by": "y"}))[0] == 403
        assert node.node.modes.mode == "active"


async def test_posting_a_mode_applies_it_at_once_and_audits_it(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n"})
    async with running_node(settings) as node:
        port = node.admin_port
        for bad, why in (({"mode": "asleep", "reason": "x", "by": "a"}, "mode"),
                         ({"mode": "isolated", "by": "a"}, "reason"),
                         ({"mode": "isolated", "reason": "x"}, "by"),
                         ([1, 2], "JSON object")):
            status, body = await call(port, "POST", "/v1/state", "t0k3n", bad)
            assert status == 400 and why in body["error"], (bad, body)
        status, body = await call(port, "POST", "/v1/state", "t0k3n", raw=b"{not json")
        assert status == 400
        status, body = await call(port, "POST", "/v1/state", "t0k3n",
                                  {"mode": "draining", "reason": "maintenance", "by": "alice"})
        assert status == 200
        assert (body["mode"], body["reason"], body["by"]) == ("draining", "maintenance",
                                                              "alice")
        assert (await admin_get(port, "/readyz"))[0] == 503
        client = await RawSMTP.connect(node.port)
        assert client.greeting == replies.NODE_NOT_ACTIVE.format(mode="draining")
        await client.close()
        (record,) = await store_of(node).audit_records()
        assert (record.action, record.operator, record.reason) == (
            "mode:draining", "alice", "maintenance")
        status, body = await call(port, "POST", "/v1/state", "t0k3n",
                                  {"mode": "active", "reason": "done", "by": "alice"})
        assert status == 200 and (await admin_get(port, "/readyz"))[0] == 200


async def test_v1_queue_counts_by_state_and_destination(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": "t0k3n"})
    async with running_node(settings) as node:  # delivery off: the mail stays queued
        for n, domain in enumerate(["a.example", "a.example", "b.example"]):
            await submit_tagged(node.port, f"q{n}", recipients=[f"u{n}@{domain}"])
        assert (await call(node.admin_port, "GET", "/v1/queue"))[0] == 401
        status, body = await call(node.admin_port, "GET", "/v1/queue", "t0k3n")
        assert status == 200
        assert body["by_state"]["queued"] == 3 and body["by_state"]["uncertain"] == 0
        assert body["by_destination"] == [
            {"destination": "a.example", "state": "queued", "count": 2},
            {"destination": "b.example", "state": "queued", "count": 1},
        ]
        assert body["oldest_pending_s"] >= 0 and body["journal_backlog"] == 0
