"""The fleet's inventory, ``fleet.toml``: the fleet database and the nodes.

A mistake in the file (an unknown key, a node named twice, a token variable that is not
set) is a :class:`ConfigError` with one line, which the CLI answers with exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class Fleet(_Table):
    """The whole inventory."""

    fleet: FleetSection = Field(default_factory=FleetSection)
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
