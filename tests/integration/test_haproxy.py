"""A real HAProxy in front of three real nodes, with the PROXY protocol (issue 11).

The nodes only let 127.0.0.5 submit and read PROXY headers from 127.0.0.1, HAProxy's own
address: a submission through HAProxy is accepted only if the node judges the client's
address, not the balancer's. The tests share the nodes and the balancer; each leaves
every node active and UP.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import parse_queue_id
from tests.support.haproxy import HAPROXY, Backend, HAProxy
from tests.support.process import NodeProcess
from tests.support.smtp import RawSMTP, queue_id_of

TOKEN = "haproxy-test-token"
NAMES = ("a", "b", "c")
ALLOWED = "127.0.0.5"
OUTSIDER = "127.0.0.9"


@dataclass
class Balanced:
    """Three nodes, their stores, and HAProxy in front of them."""

    nodes: dict[str, NodeProcess]
    stores: dict[str, Store]
    haproxy: HAProxy

    async def count(self) -> int:
        """Messages in all the nodes' stores."""
        return sum([await store.message_count() for store in self.stores.values()])

    async def set_mode(self, name: str, mode: str) -> None:
        """POST /v1/state on ``name``'s admin port."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.post(f"http://127.0.0.1:{self.nodes[name].admin_port}/v1/state",
                          json={"mode": mode, "reason": "haproxy test", "by": "test"},
                          headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200, await response.text()


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
async def balanced(pg_admin_dsn: str, template_dsn: str,
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Balanced]:
    """Three node subprocesses (each on its own database, delivery off) behind HAProxy."""
    workdir = tmp_path_factory.mktemp("haproxy")
    template = urlsplit(template_dsn).path.lstrip("/")
    databases = [f"test_{uuid.uuid4().hex[:12]}" for _ in NAMES]
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        for database in databases:
            await admin.execute(f"CREATE DATABASE {database} TEMPLATE {template}")
    finally:
        await admin.close()
    dsns = {name: _with_database(pg_admin_dsn, db) for name, db in zip(NAMES, databases,
                                                                          strict=True)}
    nodes = {name: NodeProcess.configure(
        workdir / name, dsns[name], node={"name": name, "mode_poll": 1.0},
        admin={"token": TOKEN},
        smtp={"hostname": f"{name}.test.invalid", "allowed_networks": [f"{ALLOWED}/32"],
              "proxy_protocol_from": ["127.0.0.1/32"]}) for name in NAMES}
    stores: dict[str, Store] = {}
    haproxy = HAProxy(workdir / "haproxy", [Backend(name, node.smtp_port, node.admin_port)
                                            for name, node in nodes.items()])
    try:
        await asyncio.gather(*(node.start() for node in nodes.values()))
        for name in NAMES:
            stores[name] = await Store.open(dsns[name], Settings(
                node={"name": name, "data_dir": str(workdir / name / "data"), "workers": 2,
                      "intake_db_slots": 2},
                database={"dsn": dsns[name]}, delivery={"enabled": False}))
        await haproxy.start()
        yield Balanced(nodes, stores, haproxy)
    finally:
        await haproxy.close()
        for store in stores.values():
            await store.close()
        await asyncio.gather(*(node.close() for node in nodes.values()))
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            for database in databases:
                await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        finally:
            await admin.close()


def smtplib_submit(port: int, source: str, tag: str) -> tuple[str, int, str]:
    """Submit one message with smtplib from ``source``: the node's EHLO name, the
    MAIL reply code, and the DATA reply (empty if MAIL was refused)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("app.test")
        node = (client.ehlo_resp or b"").decode().splitlines()[0]
        code, _ = client.mail("app@example.org")
        if code != 250:
            return node, code, ""
        client.rcpt("user@example.com")
        data_code, text = client.data(f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())
        return node, code, f"{data_code} {text.decode()}"


async def submit(port: int, tag: str) -> tuple[str, str]:
    """One session through HAProxy from the allowed address: the node that greeted
    (by its hostname) and the reply that ended it (250, or the first 4xx/5xx)."""
    client = await RawSMTP.connect(port, source=ALLOWED)
    node = client.greeting[4:].split(".", 1)[0]
    try:
        if not client.greeting.startswith("220 "):
            return node, client.greeting
        for line in ("EHLO app.test", "MAIL FROM:<app@example.org>", "RCPT TO:<u@example.com>"):
            reply = await client.cmd(line)
            if not reply.startswith("250"):
                return node, reply
        reply = await client.cmd("DATA")
        if not reply.startswith("354"):
            return node, reply
        await client.send(f"Subject: {tag}\r\n\r\n{tag}\r\n.\r\n".encode())
        return node, await client.reply()
    except ConnectionError as exc:
        return node, f"connection lost: {exc}"
    finally:
        with contextlib.suppress(ConnectionError):
            await client.close()


async def assert_stored(balanced: Balanced, accepted: list[tuple[str, str]]) -> None:
    """Every ``(node, 250 reply)`` is in that node's store, from the real client."""
    for node, reply in accepted:
        record = await balanced.stores[node].message(parse_queue_id(queue_id_of(reply)))
        assert record is not None, f"{reply!r} from {node} but not in its store"
        assert record.client_address == ALLOWED, record.client_address


async def test_smtplib_through_haproxy_just_works(balanced: Balanced) -> None:
    node, mail_code, reply = await asyncio.to_thread(
        smtplib_submit, balanced.haproxy.port, ALLOWED, "smtplib")
    assert mail_code == 250 and reply.startswith("250 2.0.0 Ok: queued as "), reply
    name = node.split(".", 1)[0]
    message_id = parse_queue_id(queue_id_of(reply))
    record = await balanced.stores[name].message(message_id)
    assert record is not None and record.client_address == ALLOWED
    content = await balanced.stores[name].message_content(message_id)
    assert content is not None
    assert content[0].startswith(f"Received: from app.test ([{ALLOWED}])".encode()), content[0]


async def test_the_node_judges_the_client_address_not_the_balancers(
    balanced: Balanced,
) -> None:
    before = await balanced.count()
    _, mail_code, _ = await asyncio.to_thread(
        smtplib_submit, balanced.haproxy.port, OUTSIDER, "outsider")
    assert mail_code == 530
    node, reply = await submit(balanced.haproxy.port, "insider")
    assert reply.startswith("250 "), reply
    await assert_stored(balanced, [(node, reply)])
    assert await balanced.count() == before + 1


async def test_no_message_answered_250_through_haproxy_is_lost(balanced: Balanced) -> None:
    before = await balanced.count()
    results = await asyncio.gather(*(submit(balanced.haproxy.port, f"burst-{n}")
                                     for n in range(60)))
    accepted = [(node, reply) for node, reply in results if reply.startswith("250 ")]
    assert len(accepted) == 60, [r for r in results if not r[1].startswith("250 ")]
    assert {node for node, _ in accepted} == set(NAMES), "leastconn spreads a burst"
    await assert_stored(balanced, accepted)
    assert await balanced.count() == before + len(accepted)


async def test_draining_a_node_moves_new_sessions_to_the_other_two(
    balanced: Balanced,
) -> None:
    haproxy = balanced.haproxy
    accepted: list[tuple[str, str]] = []
    stop = asyncio.Event()

    async def application() -> None:
        """Submit one message after another, retrying each on 4xx, as an app does."""
        n = 0
        while not stop.is_set():
            node, reply = await submit(haproxy.port, f"steady-{n}")
            if reply.startswith("250 "):
                accepted.append((node, reply))
                n += 1
            else:
                assert reply[:1] == "4" or reply.startswith("connection lost"), reply

    before = await balanced.count()
    traffic = asyncio.create_task(application())
    try:
        await balanced.set_mode("b", "draining")
        await haproxy.wait_status("b", "DOWN", timeout=10)
        later = [await submit(haproxy.port, f"after-{n}") for n in range(15)]
        assert all(reply.startswith("250 ") for _, reply in later), later
        assert {node for node, _ in later} <= {"a", "c"}, later
        stop.set()
        await asyncio.wait_for(traffic, 30)
        await assert_stored(balanced, accepted + later)
        assert await balanced.count() == before + len(accepted) + len(later)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(traffic, return_exceptions=True), 30)
        await balanced.set_mode("b", "active")
        await haproxy.wait_status("b", "UP", timeout=10)


async def test_the_shipped_config_is_valid() -> None:
    shipped = Path(__file__).parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-c", "-f", str(shipped),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out.decode(errors="replace")
    text = shipped.read_text()
    for needle in ("mode tcp", "option httpchk GET /readyz", "send-proxy-v2",
                   "inter 1s fall 2 rise 2", "check port", "stats socket",
                   "on-marked-down shutdown-sessions"):
        assert needle in text, needle
