"""The Postgres store: schema, migrations, enqueue, claims and the embedded server."""

from mta.queue.embedded import EmbeddedPostgres, EmbeddedServerSettings
from mta.queue.migrate import available_migrations, migrate
from mta.queue.records import (
    ClaimedDelivery,
    DeliveryRecord,
    MessageRecord,
    NewMessage,
    recipient_next_hop,
)
from mta.queue.server import ServerState, connect_once, migrate_dsn, read_server_state
from mta.queue.store import Store

__all__ = [
    "ClaimedDelivery",
    "DeliveryRecord",
    "EmbeddedPostgres",
    "EmbeddedServerSettings",
    "MessageRecord",
    "NewMessage",
    "ServerState",
    "Store",
    "available_migrations",
    "connect_once",
    "migrate",
    "migrate_dsn",
    "read_server_state",
    "recipient_next_hop",
]
