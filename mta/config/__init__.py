"""Typed configuration: TOML plus ``MTA_…`` environment, the budget and the bounds."""

from mta.config.budget import (
    ConnectionBudget,
    ServerLimits,
    budget_violation,
    connection_budget,
    memory_bound_bytes,
)
from mta.config.delivery_settings import DeliverySection, RouteSection
from mta.config.loader import Settings, describe_validation_error, load_settings, read_toml
from mta.config.settings import (
    ProcessRole,
    TlsPolicy,
    UncertainMode,
    User,
    parse_host_port,
)

__all__ = [
    "ConnectionBudget",
    "DeliverySection",
    "ProcessRole",
    "RouteSection",
    "ServerLimits",
    "Settings",
    "TlsPolicy",
    "UncertainMode",
    "User",
    "budget_violation",
    "connection_budget",
    "describe_validation_error",
    "load_settings",
    "memory_bound_bytes",
    "parse_host_port",
    "read_toml",
]
