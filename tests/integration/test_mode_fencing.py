"""A controller's mode changes carry its term (fencing): a node refuses an older term
than it accepted, an operator's change carries none and always goes through; and a node
whose store is down can still be isolated (the change reaches the store when it is back)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg

from mta.config import Settings
from tests.integration.test_admin_api import call
from tests.support.admin import admin_get
from tests.support.intake import running_node, store_of
from tests.support.nodes import wait_for

TOKEN = "t0k3n"


def body(mode: str, term: int | None = None, by: str = "controller") -> dict[str, object]:
    return {"mode": mode, "reason": "fencing test", "by": by,
            **({"term": term} if term is not None else {})}


async def test_an_older_term_is_refused_and_an_operator_is_always_heard(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": TOKEN})
    async with running_node(settings) as node:
        port = node.admin_port
        status, state = await call(port, "POST", "/v1/state", TOKEN, body("draining", 5))
        assert (status, state["term"]) == (200, 5)
        status, state = await call(port, "POST", "/v1/state", TOKEN, body("isolated", 3))
        assert status == 409 and "older" in state["error"]
        assert node.node.modes.mode == "draining", "a stale leader changes nothing"
        status, state = await call(port, "POST", "/v1/state", TOKEN,
                                   body("active", by="alice"))
        assert (status, state["mode"], state["term"]) == (200, "active", 5)
        status, _ = await call(port, "POST", "/v1/state", TOKEN, body("isolated", 6))
        assert status == 200 and node.node.modes.mode == "isolated"
        for bad in (-1, "7", 1.5, True):
            status, state = await call(port, "POST", "/v1/state", TOKEN,
                                       {**body("active"), "term": bad})
            assert status == 400 and "term" in state["error"], bad
        actions = [r.action for r in await store_of(node).audit_records()]
        assert actions == ["mode:isolated", "mode:active", "mode:draining"]


async def test_a_node_whose_store_is_down_is_isolated_at_once_and_stored_later(
    make_settings: Callable[..., Settings], pg_admin_dsn: str, db_dsn: str,
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0", "token": TOKEN},
                             node={"mode_poll": 0.5})
    database = urlsplit(db_dsn).path.lstrip("/")
    async with running_node(settings) as node:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1", database)
            await wait_for(lambda: not node.node.store_up, timeout=20)
            status, state = await call(node.admin_port, "POST", "/v1/state", TOKEN,
                                       body("isolated", by="alice"))
            assert (status, state["mode"], state["stored"]) == (200, "isolated", False)
            status, text = await admin_get(node.admin_port, "/readyz")
            assert status == 503 and '"mode": "isolated"' in text
            await admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")
        finally:
            await admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")
            await admin.close()

        async def stored() -> bool:
            found = await store_of(node).node_mode(settings.node.name)
            return found is not None and found.mode == "isolated"

        await wait_for(stored, timeout=30)
        assert node.node.modes.mode == "isolated", "the store came back and kept it"
        (record, *_) = await store_of(node).audit_records()
        assert (record.action, record.operator) == ("mode:isolated", "alice")
