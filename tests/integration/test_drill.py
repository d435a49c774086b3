"""Seed incident 1, rebuilt (issue 11): three nodes behind a real HAProxy, a running
controller, de-duplication on, and an application that retries on 4xx. Node B's store
runs out of connections and then stops; B degrades (451, /readyz 503, /metrics with
mta_store_up 0); the controller isolates it; HAProxy stops sending to it and traffic goes
on through A and C. B's store comes back; the operator reconciles and reroutes B. Every
message ever answered 250 is delivered exactly once, or listed uncertain on B."""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg

from mta.queue import EmbeddedServerSettings, Store
from tests.support.admin import metric
from tests.support.fleet import TOKEN, ControllerProcess, FleetUnderTest
from tests.support.haproxy import Backend, HAProxy
from tests.support.nodes import wait_for
from tests.support.pg import DATABASE, own_postgres
from tests.support.process import NodeProcess
from tests.support.sink import Sink, normalize_id

APP = "127.0.0.5"
MESSAGES = 120
#: B's own server: small, so that a helper can take every connection it has.
B_SERVER = EmbeddedServerSettings(max_connections=30)


def submit(port: int, tag: str) -> str | None:
    """One submission from the application's address: the 250's queue id, or None for a
    4xx or a broken connection (the application then retries, as its MTA would)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, source_address=(APP, 0), timeout=10) as client:
            client.ehlo("app.test")
            client.sendmail("app@example.org", ["user@example.com"],
                            f"Message-ID: <{tag}@drill.test>\r\nSubject: {tag}\r\n\r\n"
                            f"body {tag}\r\n".encode())
            return tag  # sendmail raises unless DATA was answered 250
    except (smtplib.SMTPException, OSError):
        return None


class Application:
    """Submits MESSAGES messages through HAProxy, retrying each on failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered: set[str] = set()
        self.attempts = 0

    async def run(self, pause: asyncio.Event) -> None:
        for n in range(MESSAGES):
            tag = f"m{n}"
            for _ in range(200):  # bounded: each retry waits a moment, like a client's backoff
                await pause.wait()
                self.attempts += 1
                if await asyncio.to_thread(submit, self.port, tag) is not None:
                    self.answered.add(tag)
                    break
                await asyncio.sleep(0.1)


async def take_every_connection(dsn: str, victim: str) -> list[asyncpg.Connection]:
    """Hold every free connection of the server, and terminate ``victim``'s own."""
    held: list[asyncpg.Connection] = []
    for _round in range(2):
        for _ in range(B_SERVER.max_connections + 5):
            try:
                held.append(await asyncpg.connect(dsn, timeout=5))
            except (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError,
                    OSError):
                break
        if held:
            await held[0].execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name LIKE $1", f"mta/{victim}%")
    return held


async def admin_json(port: int, path: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(f"http://127.0.0.1:{port}{path}",
                     headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        return response.status, await response.json()


async def test_seed_incident_1_drill(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet_db = new_database()
    async with own_postgres(tmp_path / "b-server", B_SERVER) as b_server:
        dsns = {"a": new_database(), "b": b_server.dsn_for(DATABASE), "c": new_database()}
        nodes = {name: NodeProcess.configure(
            tmp_path / name, dsn,
            node={"name": name, "mode_poll": 1.0, "workers": 2, "intake_db_slots": 2},
            database={"acquire_timeout": 1.0, "commit_timeout": 2.0, "connect_timeout": 2.0},
            admin={"token": TOKEN},
            smtp={"allowed_networks": [f"{APP}/32"], "proxy_protocol_from": ["127.0.0.1/32"]},
            dedup={"enabled": True, "database": fleet_db},
            delivery={"enabled": True, "poll_interval": 0.2, "routes": [
                {"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}]},
        ) for name, dsn in dsns.items()}
        for node in nodes.values():
            node.write_config()
        fleet = FleetUnderTest(tmp_path, nodes, dsns, database=fleet_db,
                               controller={"poll_interval": "0.5s", "cooldown": "10m"},
                               rules=[{"signal": "store_down", "above": 0, "for": "2s",
                                       "action": "isolate"}])
        fleet.write()
        haproxy = HAProxy(tmp_path / "haproxy", [Backend(n, p.smtp_port, p.admin_port)
                                                 for n, p in nodes.items()])
        controller: ControllerProcess | None = None
        app_task: asyncio.Task[None] | None = None
        held: list[asyncpg.Connection] = []
        try:
            await fleet.start()
            await haproxy.start()
            controller = ControllerProcess.spawn(fleet)
            app = Application(haproxy.port)
            flowing = asyncio.Event()
            flowing.set()
            app_task = asyncio.create_task(app.run(flowing))
            await wait_for(lambda: len(app.answered) >= 30, timeout=60)

            # 2. B's store runs out of connections, then stops.
            held = await take_every_connection(b_server.dsn, "b")
            b = nodes["b"]
            await wait_for(lambda: _metric_is(b.admin_port, "mta_store_up", 0), timeout=30)
            for conn in held:
                with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError,
                                         asyncpg.InterfaceError):
                    await conn.close(timeout=2)
            held = []
            await asyncio.to_thread(b_server.stop)

            # 3. B degrades: /readyz 503 and /metrics still served, intake refuses.
            status, ready = await admin_json(b.admin_port, "/readyz")
            assert status == 503 and ready["store_up"] is False
            assert await metric(b.admin_port, "mta_store_up") == 0

            # 4. The controller isolates B; HAProxy stops sending to it.
            async def b_isolated() -> bool:
                _, state = await admin_json(b.admin_port, "/v1/state")
                return state["mode"] == "isolated"

            await wait_for(b_isolated, timeout=30)
            await haproxy.wait_status("b", "DOWN", timeout=15)
            await asyncio.wait_for(app_task, timeout=180)  # traffic went on through A and C
            assert app.answered == {f"m{n}" for n in range(MESSAGES)}

            # 5. B's store returns; the operator reconciles, then reroutes.
            await asyncio.to_thread(b_server.start)
            await wait_for(lambda: _metric_is(b.admin_port, "mta_store_up", 1), timeout=60)
            b_store = await Store.open(dsns["b"], fleet.settings("b"))
            try:
                async def stored_isolated() -> bool:
                    mode = await b_store.node_mode("b")
                    return mode is not None and mode.mode == "isolated"

                await wait_for(stored_isolated, timeout=30)

                async def nothing_in_flight() -> bool:  # B's sends in flight finish first
                    return (await b_store.queue_stats()).by_state["leased"] == 0

                await wait_for(nothing_in_flight, timeout=60)
                reconciled = await fleet.fleet("reconcile", "b", "--json")
                assert reconciled.returncode == 0, reconciled.stderr
                rerouted = await fleet.fleet("reroute", "b", "--json")
                assert rerouted.returncode == 0, rerouted.stderr
                uncertain = {normalize_id((await b_store.message(d.message_id)).message_id_header
                                          or "")
                             for d in await b_store.deliveries_in_state("uncertain")}
                for listing in await b_store.deliveries_in_state("uncertain"):
                    assert listing.last_reply, "an uncertain delivery carries its evidence"
            finally:
                await b_store.close()

            expected = {f"{tag}@drill.test" for tag in app.answered} - uncertain

            def arrived() -> Counter[str]:
                return Counter(normalize_id(t.message_id or "") for t in sink.transactions
                               if t.received)

            try:
                await wait_for(lambda: expected <= set(arrived()), timeout=90)
            except AssertionError:
                raise AssertionError(f"never arrived: {sorted(expected - set(arrived()))}; "
                                     f"where: {await _where(fleet, expected - set(arrived()))}"
                                     f"; reroute: {rerouted.stdout}") from None
            assert max(arrived().values()) == 1, "nothing arrived twice"
            assert set(arrived()) | uncertain == {f"{t}@drill.test" for t in app.answered}
            report = json.loads(rerouted.stdout)
            print(f"drill: {len(app.answered)} answered in {app.attempts} attempts; "
                  f"rerouted {report['moved_total']}; uncertain on b {len(uncertain)}")
        finally:
            if app_task is not None and not app_task.done():
                app_task.cancel()
            for conn in held:
                with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError,
                                         asyncpg.InterfaceError):
                    await conn.close(timeout=2)
            if controller is not None:
                await controller.close()
            await haproxy.close()
            await fleet.close()


async def _metric_is(port: int, name: str, value: float) -> bool:
    try:
        return await metric(port, name) == value
    except (OSError, AssertionError, aiohttp.ClientError):
        return False


async def _where(fleet: FleetUnderTest, missing: set[str]) -> dict[str, list[str]]:
    """For a failure message: the state of the missing messages on each node."""
    found: dict[str, list[str]] = {}
    for name, dsn in fleet.dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT m.message_id_header, d.state, d.last_reply, d.lease_owner "
                "FROM messages m JOIN deliveries d ON d.message_id = m.id")
        finally:
            await conn.close()
        found[name] = [f"{r[0]} {r[1]} {r[3]} {r[2]}" for r in rows
                       if normalize_id(r[0] or "") in missing]
    return found
