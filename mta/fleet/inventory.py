"""The fleet's inventory, ``fleet.toml``: the fleet database and the nodes.

A mistake in the file (an unknown key, a node named twice, a token variable that is not
set) is a :class:`ConfigError` with one line, which the CLI answers with exit 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mta.config import describe_validation_error, parse_host_port, read_toml
from mta.errors import ConfigError

#: Where ``--fleet`` points when neither it nor ``$MTA_FLEET`` is given.
DEFAULT_FLEET_FILE = Path("fleet.toml")
#: A node name as ``node.name`` takes it (the name its store knows it by).
NodeName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSection(_Table):
    """``[fleet]``: the shared fleet database (audit, leader lock, de-duplication)."""

    #: A Postgres DSN; empty: a local embedded store in ``--data-dir`` (one operator's host).
    database: str = ""


class NodeEntry(_Table):
    """One ``[[nodes]]`` entry: where a node takes mail, its admin API and its store."""

    name: NodeName
    #: The submission address (``host:port``), as a load balancer would reach it.
    smtp: str
    #: The admin API's base URL (``http://…`` or ``https://…``).
    admin: str
    #: The admin token itself, or the name of the environment variable that holds it.
    token: str = ""
    token_env: str = ""
    #: A CA bundle that signs the node's admin TLS certificate (default: the system's).
    admin_ca_file: Path | None = None
    #: The node's store: a DSN, or the node's own config file (opened like ``mta queue``).
    store: str = ""
    config: Path | None = None

    @field_validator("smtp")
    @classmethod
    def _smtp_is_host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("admin")
    @classmethod
    def _admin_is_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http://host:port or https://host:port, got {value!r}")
        return value.rstrip("/")

    @field_validator("store")
    @classmethod
    def _store_is_dsn(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a postgresql:// DSN")
        return value

    @model_validator(mode="after")
    def _one_of_each(self) -> NodeEntry:
        if self.token and self.token_env:
            raise ValueError("give token or token_env, not both")
        if self.store and self.config is not None:
            raise ValueError("give store or config, not both")
        if not self.store and self.config is None:
            raise ValueError("store (a DSN) or config (the node's config file) is required")
        if self.config is not None and not self.config.is_file():
            raise ValueError(f"config: file not found: {self.config}")
        if self.admin_ca_file is not None and not self.admin_ca_file.is_file():
            raise ValueError(f"admin_ca_file: file not found: {self.admin_ca_file}")
        return self

    def admin_token(self) -> str:
        """The admin token (read from its variable now); '' when none is configured."""
        if not self.token_env:
            return self.token
        value = os.environ.get(self.token_env, "")
        if not value:
            raise ConfigError(f"node {self.name}: token_env {self.token_env} is not set")
        return value


#: A duration: seconds, or a number with a unit (``30s``, ``2m``, ``1h``, ``7d``, ``1w``).
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(text: str) -> float:
    """``30s``, ``2m``, ``1h``, ``7d`` or ``1w`` in seconds; ``ValueError`` otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 2m, 1h or 7d, got {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def _seconds(value: object) -> object:
    return duration_seconds(value) if isinstance(value, str) else value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
#: The figures a controller rule may watch (README, "The controller").
Signal = Literal["unreachable", "store_down", "not_ready", "heartbeat_age_s",
                 "attempt_p95_s", "timeout_ratio", "oldest_pending_s", "intake_451_per_s"]


class ControllerRule(_Table):
    """``[[controller.rules]]``: act on a node whose ``signal`` stays past a threshold."""

    signal: Signal
    above: float | None = None
    below: float | None = None
    #: How long the condition must hold before the controller acts (like an alert's).
    for_: Seconds = Field(default=0.0, alias="for")
    action: Literal["drain", "isolate"]
    #: Move the node's pending mail to healthy nodes after acting.
    reroute: bool = False

    @model_validator(mode="after")
    def _one_threshold(self) -> ControllerRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of above and below")
        return self

    def breached(self, value: float) -> bool:
        """Whether ``value`` is past this rule's threshold."""
        return value > self.above if self.above is not None else value < (self.below or 0)


#: The rules a controller applies when fleet.toml gives none (README lists them).
DEFAULT_RULES = (
    ControllerRule(signal="store_down", above=0, **{"for": 30.0}, action="isolate"),
    ControllerRule(signal="timeout_ratio", above=0.5, **{"for": 120.0}, action="drain"),
    ControllerRule(signal="attempt_p95_s", above=60, **{"for": 120.0}, action="drain"),
)


class ControllerSection(_Table):
    """``[controller]``: how the controller watches and how far it may go."""

    #: At most this many nodes out of ``active`` at once, whoever took them out.
    max_nodes_out: Annotated[int, Field(ge=0)] = 1
    poll_interval: Annotated[Seconds, Field(gt=0)] = 5.0
    #: After acting on a node, leave it alone this long.
    cooldown: Seconds = 600.0
    #: Where the controller serves its own /metrics.
    listen: str = "127.0.0.1:9330"
    rules: tuple[ControllerRule, ...] = DEFAULT_RULES

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value


class Fleet(_Table):
    """The whole inventory."""

    fleet: FleetSection = Field(default_factory=FleetSection)
    controller: ControllerSection = Field(default_factory=ControllerSection)
    nodes: tuple[NodeEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> Fleet:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"node {node.name!r} is listed twice")
            seen.add(node.name)
        return self

    def node(self, name: str) -> NodeEntry:
        """The node named ``name``; ``ConfigError`` naming the known ones otherwise."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"no node {name!r} in the fleet (known: {known})")


def fleet_file(given: Path | None) -> Path:
    """``--fleet``, else ``$MTA_FLEET``, else ``./fleet.toml``."""
    if given is not None:
        return given
    from_env = os.environ.get("MTA_FLEET", "")
    return Path(from_env) if from_env else DEFAULT_FLEET_FILE


def load_fleet(path: Path) -> Fleet:
    """Read and validate ``path``; every token variable must be set."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (pass --fleet or set MTA_FLEET)")
    values = read_toml(path)
    base = path.resolve().parent
    for node in values.get("nodes", []) if isinstance(values.get("nodes"), list) else []:
        for key in ("config", "admin_ca_file"):
            if isinstance(node, dict) and isinstance(node.get(key), str):
                node[key] = str(base / node[key])
    try:
        fleet = Fleet(**values)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    for node in fleet.nodes:
        try:
            node.admin_token()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return fleet
