"""Typed node settings: one model per TOML table, validated once at start."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

NonNegativeBytes = Annotated[ByteSize, Field(ge=0)]
#: How a delivery talks TLS to its next hop (``mta.delivery.outbound.session``).
TlsPolicy = Literal["none", "opportunistic", "required", "verify"]
#: What a lost reply to the final dot makes of a delivery: ``uncertain``, or a deferral
#: marked ``possible_duplicate``.
UncertainMode = Literal["uncertain", "retry"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 hosts in brackets) and check the port range."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"port must be 0-65535 (0: any free port), got {port_text!r}")
    return host, int(port_text)


#: What a node process does: take SMTP, deliver, or both.
ProcessRole = Literal["both", "intake", "delivery"]


class NodeSection(Section):
    """Identity, data directory and the sizing that derives the connection pool."""

    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    data_dir: Path = Path("./data")
    processes: PositiveInt = 1
    #: Postfix's split: this many processes only take SMTP and this many only deliver
    #: (both 0: every one of ``processes`` does both). Set, they make ``processes``.
    intake_processes: Annotated[int, Field(ge=0)] = 0
    delivery_processes: Annotated[int, Field(ge=0)] = 0
    workers: PositiveInt = 8
    intake_db_slots: PositiveInt = 8
    #: Seconds between reads of the node's mode from its store, the fallback to the
    #: NOTIFY that announces a change at once.
    mode_poll: PositiveFloat = 5.0

    @model_validator(mode="after")
    def _split_makes_processes(self) -> NodeSection:
        split = (self.intake_processes, self.delivery_processes)
        if split == (0, 0):
            return self
        if 0 in split:
            raise ValueError("intake_processes and delivery_processes are set together "
                             "(each at least 1), or neither")
        if "processes" in self.model_fields_set:
            raise ValueError("processes and intake_processes/delivery_processes are "
                             "exclusive: set one or the other")
        return self

    @property
    def process_count(self) -> int:
        """How many processes the node runs, whatever their roles."""
        return self.intake_processes + self.delivery_processes or self.processes

    def roles(self) -> tuple[ProcessRole, ...]:
        """Each process's role, by index: the intake ones first (the first process also
        reports the queue and keeps the embedded server)."""
        both: tuple[ProcessRole, ...] = ("both",)
        intake: tuple[ProcessRole, ...] = ("intake",)
        delivery: tuple[ProcessRole, ...] = ("delivery",)
        if self.intake_processes == 0:
            return both * self.process_count
        return intake * self.intake_processes + delivery * self.delivery_processes


class DatabaseSection(Section):
    """Where the store lives and how long the node waits for it."""

    dsn: str = ""
    acquire_timeout: PositiveFloat = 5.0
    commit_timeout: PositiveFloat = 10.0
    connect_timeout: PositiveFloat = 5.0
    connections_reserve: Annotated[int, Field(ge=0)] = 10
    allow_unsafe_durability: bool = False
    queued_bytes_refresh: PositiveFloat = 5.0
    #: Bodies of this size and up (below 2 MiB, which are streamed) are stored
    #: compressed with zstd when that saves an eighth (mta.queue.body_codec); 0: never.
    compress_bodies_above: NonNegativeBytes = ByteSize(64 * 1024)

    @field_validator("dsn")
    @classmethod
    def _dsn_parses(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL (or empty for the embedded server)")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as exc:
            raise ValueError(f"malformed port: {exc}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("names no host")
        return value


class SmtpSection(Section):
    """The submission listener, its access rules and its limits."""

    listen: str = "127.0.0.1:2525"
    tls_listen: str = ""
    hostname: str = Field(default_factory=socket.getfqdn, min_length=1)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    auth_without_tls: bool = False
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: Load balancers whose connections begin with a PROXY header (v1 or v2) that names
    #: the real client (Postfix's smtpd_upstream_proxy_protocol); others never send one.
    proxy_protocol_from: tuple[str, ...] = ()
    #: Seconds a listed balancer has to send its PROXY header before the node hangs up.
    proxy_protocol_timeout: PositiveFloat = 5.0
    max_message_size: Annotated[ByteSize, Field(gt=0)] = ByteSize(20 * 1024 * 1024)
    max_recipients: PositiveInt = 1000
    max_line_length: Annotated[int, Field(ge=78)] = 998
    max_commands: PositiveInt = 10_000
    idle_timeout: PositiveFloat = 300.0
    max_sessions: PositiveInt = 500
    #: Sessions one client address may hold at once (Postfix's
    #: smtpd_client_connection_count_limit), so one client cannot take every session.
    max_sessions_per_client: PositiveInt = 50
    data_concurrency: PositiveInt = 16
    max_received_headers: PositiveInt = 50
    auth_failure_limit: PositiveInt = 5
    auth_failure_window: PositiveFloat = 300.0
    shutdown_grace: PositiveFloat = 10.0

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("tls_listen")
    @classmethod
    def _tls_listen_is_host_port(cls, value: str) -> str:
        if value:
            parse_host_port(value)
        return value

    @field_validator("allowed_networks", "proxy_protocol_from")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network") from None
        return value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> SmtpSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_listen and self.tls_cert_file is None:
            raise ValueError("tls_listen needs tls_cert_file and tls_key_file")
        return self


class DedupSection(Section):
    """Fleet-wide de-duplication of client retries (off by default; README, Dedup)."""

    enabled: bool = False
    #: How long a message's keys are remembered.
    window: PositiveFloat = 86400.0
    #: The fleet database's DSN, where the keys are shared by every node.
    database: str = ""
    #: Connections each node process may open to it (counted in the budget, I6).
    connections: PositiveInt = 2
    #: Seconds intake waits for the key store before accepting without the check.
    timeout: PositiveFloat = 0.5

    @model_validator(mode="after")
    def _database_when_enabled(self) -> DedupSection:
        if self.enabled and not self.database:
            raise ValueError("enabled needs database (the fleet database's DSN)")
        if self.database and urlsplit(self.database).scheme not in ("postgresql", "postgres"):
            raise ValueError("database: expected a postgresql:// DSN")
        return self


class AdmissionSection(Section):
    """Refuse new mail (452 4.3.1) before the store's disk or queue runs over."""

    min_free_disk: NonNegativeBytes = ByteSize(1024 * 1024 * 1024)
    max_queued_bytes: NonNegativeBytes = ByteSize(20 * 1024 * 1024 * 1024)


class RetentionSection(Section):
    """How long finished (delivered or failed) mail stays in the store."""

    body_after: Annotated[float, Field(ge=0)] = 86400.0
    metadata_after: Annotated[float, Field(ge=0)] = 7 * 86400.0
    #: The node's audit trail (operator actions) outlives the messages it names.
    audit_after: Annotated[float, Field(ge=0)] = 90 * 86400.0
    batch: PositiveInt = 500
    interval: PositiveFloat = 60.0


class AdminSection(Section):
    """The admin HTTP listener (metrics and health) and its API's bearer tokens."""

    listen: str = "127.0.0.1:9325"
    #: Tokens ``/v1/*`` accepts; several, so that one can be rotated without downtime.
    token: tuple[str, ...] = ()
    #: A file with more tokens, one per line (kept out of the config file).
    token_file: Path | None = None
    #: Both set: the admin port (metrics, health, ``/v1/*``) serves HTTPS only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("token", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("token_file")
    @classmethod
    def _token_file_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _tls_file_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                with value.open("rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _tls_pair_loads(self) -> AdminSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        self.tls_context()  # a certificate that does not load, or another key, fails now
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The admin port's server TLS context (TLS 1.2 or later), or None: plain HTTP."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls_cert_file {self.tls_cert_file} with tls_key_file "
                             f"{self.tls_key_file} does not load: {exc}") from None
        return context

    def tokens(self) -> tuple[str, ...]:
        """Every accepted token: ``token`` and the lines of ``token_file``."""
        listed = tuple(t for t in self.token if t)
        if self.token_file is None:
            return listed
        lines = self.token_file.read_text(encoding="utf-8").splitlines()
        return listed + tuple(line.strip() for line in lines if line.strip())

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value


class LogSection(Section):
    """Structured logging on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    #: ``hashed``: an address in a log line keeps its domain, its local part becomes a
    #: hash (the same address, the same hash); ``full``: addresses as they are.
    addresses: Literal["hashed", "full"] = "hashed"


class User(Section):
    """A submission account: a name and a hash made by ``mta user hash``."""

    name: str = Field(min_length=1)
    password_hash: str = Field(pattern=r"^\$scrypt\$")
