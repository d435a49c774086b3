"""Builds one process's delivery from the settings: recovery first, then the deliverer."""

from __future__ import annotations

import asyncio

import structlog

from mta.admin.metrics import Metrics
from mta.admin.scrape import export_journal
from mta.config import Settings
from mta.delivery.deliverer import Deliverer
from mta.delivery.outbound.cache import ConnectionCache
from mta.delivery.owner import process_owner
from mta.delivery.reconcile import journal_dir, recover_node
from mta.delivery.retry import RetryPolicy
from mta.delivery.routing import Router
from mta.delivery.shaping import Shaper, ShapingConfig
from mta.journal.files import journal_identity
from mta.journal.writer import Journal
from mta.queue.store import Store

log = structlog.get_logger(__name__)


async def start_delivery(settings: Settings, store: Store, metrics: Metrics) -> Deliverer:
    """Replay dead processes' journals, then build this process's deliverer."""
    config = settings.delivery
    directory = journal_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    owner = process_owner(settings.node.name)
    identity = await asyncio.to_thread(journal_identity, directory)
    journal = await asyncio.to_thread(Journal.open, directory, owner)
    # Before anything is claimed: recovery trusts this owner's journal only from here.
    await store.register_journal_owner(owner, identity)
    report = await recover_node(store, settings, identity)
    log.info("delivery.recovered", owner=owner, applied=report.applied,
             uncertain=report.uncertain, released=report.released,
             set_aside=report.set_aside, journal_missing=report.journal_missing)
    metrics.records_set_aside.labels("replay").inc(report.set_aside)
    export_journal(metrics, journal)
    return Deliverer(
        settings=settings, store=store, router=Router(config),
        shaper=Shaper(ShapingConfig.from_settings(config)),
        connections=ConnectionCache(config, ehlo_name=settings.ehlo_name), journal=journal,
        policy=RetryPolicy.from_settings(config), owner=owner, metrics=metrics)
