"""Issue 12's metrics: what a node exports beside the older ones, and that the store-wide
figures say how old they are while the store is down (I7)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import trustme
from cryptography import x509

from mta import __version__
from mta.config import Settings
from tests.support.admin import admin_get, metric
from tests.support.delivery import submit_tagged
from tests.support.intake import running_node
from tests.support.nodes import NodeHandle, start_node, wait_for
from tests.support.sink import Faults, Sink

README = Path(__file__).resolve().parents[2] / "README.md"


def sample(node: NodeHandle, name: str, **labels: str) -> float | None:
    """One sample of the node's registry, or None when it is not exported."""
    for family in node.node.metrics.registry.collect():
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def delivering(make_settings: Callable[..., Settings], sink: Sink) -> Settings:
    return make_settings(delivery={
        "enabled": True, "poll_interval": 60.0, "minimal_backoff": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })


async def test_a_scrape_with_the_store_stopped_answers_and_the_queue_figures_age(
    make_settings: Callable[..., Settings], pg_admin_dsn: str, db_dsn: str,
) -> None:
    settings = make_settings(admin={"listen": "127.0.0.1:0"},
                             database={"queued_bytes_refresh": 0.2})
    database = urlsplit(db_dsn).path.lstrip("/")
    async with running_node(settings) as node:
        port = node.admin_port

        async def fresh() -> bool:
            return await metric(port, "mta_queue_stats_age_seconds") < 1.0

        await wait_for(fresh, timeout=10)
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1", database)

            async def store_down() -> bool:
                return await metric(port, "mta_store_up") == 0

            await wait_for(store_down, timeout=20)
            status, text = await admin_get(port, "/metrics")
            assert status == 200 and "mta_store_up 0.0" in text
            first = await metric(port, "mta_queue_stats_age_seconds")

            async def older() -> bool:
                return await metric(port, "mta_queue_stats_age_seconds") > first + 1.0

            await wait_for(older, timeout=10)
        finally:
            await admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")
            await admin.close()
        await wait_for(fresh, timeout=20)  # refreshed again once the store answers


async def test_deliveries_export_latency_send_time_last_success_and_heartbeats(
    make_settings: Callable[..., Settings], sink: Sink,
) -> None:
    node = await start_node(delivering(make_settings, sink))
    try:
        await submit_tagged(node.port, "g1", recipients=["a@example.com"])
        await wait_for(lambda: sample(node, "mta_delivery_last_success_timestamp_seconds"),
                       timeout=10)
        assert sample(node, "mta_delivery_accept_to_delivered_seconds_count") == 1
        send_count = [s for f in node.node.metrics.registry.collect() for s in f.samples
                      if s.name == "mta_delivery_send_seconds_count"]
        assert [s.value for s in send_count] == [1.0], send_count
        assert (sample(node, "mta_delivery_heartbeat_timestamp_seconds") or 0) > 0
        assert sample(node, "mta_build_info", version=__version__) == 1
        assert (sample(node, "mta_store_pool_acquire_wait_seconds_count",
                       share="intake") or 0) >= 1
        assert sample(node, "mta_store_pool_acquire_timeouts_total", share="delivery") == 0
        assert sample(node, "mta_journal_backlog_records") == 0
        assert (sample(node, "mta_journal_backlog_bytes") or 0) > 0  # the attempt's records
    finally:
        await node.stop()


async def test_a_4xx_reply_counts_a_deferral_by_reason(
    make_settings: Callable[..., Settings], sink: Sink,
) -> None:
    sink.faults = Faults(reject={"later@example.com": "451 4.7.1 try later"})
    node = await start_node(delivering(make_settings, sink))
    try:
        await submit_tagged(node.port, "g2", recipients=["later@example.com"])
        await wait_for(lambda: sample(node, "mta_delivery_deferred_total",
                                      reason="reply_4xx") == 1, timeout=10)
        assert sample(node, "mta_delivery_deferred_total", reason="no_reply") == 0
        assert sample(node, "mta_delivery_last_success_timestamp_seconds") == 0
    finally:
        await node.stop()


async def test_the_smtp_certificate_expiry_is_exported(
    make_settings: Callable[..., Settings], ca: trustme.CA, tmp_path: Path,
) -> None:
    cert = ca.issue_cert("mx.test.invalid")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    expires = x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
    settings = make_settings(admin={"listen": "127.0.0.1:0"},
                             smtp={"tls_cert_file": str(cert_file),
                                   "tls_key_file": str(key_file)})
    async with running_node(settings) as node:
        status, text = await admin_get(node.admin_port, "/metrics")
        match = re.search(r'^mta_tls_certificate_expiry_timestamp_seconds\{listener="smtp"\} '
                          r"(\S+)$", text, re.MULTILINE)
        assert status == 200 and match is not None, text
        assert float(match[1]) == expires.timestamp()
        assert 'listener="admin"' not in text


async def test_every_metric_a_delivering_node_exports_is_in_the_readme(
    make_settings: Callable[..., Settings], sink: Sink,
) -> None:
    readme = README.read_text(encoding="utf-8")
    node = await start_node(delivering(make_settings, sink))
    try:
        await submit_tagged(node.port, "g3", recipients=["a@example.com"])
        await wait_for(lambda: sample(node, "mta_delivery_last_success_timestamp_seconds"),
                       timeout=10)
        names = {family.name + ("_total" if family.type == "counter" else "")
                 for family in node.node.metrics.registry.collect()}
        names = {"mta_node_info" if name == "mta_node" else name for name in names}
        missing = sorted(name for name in names if f"`{name}" not in readme)
        assert missing == []
    finally:
        await node.stop()
