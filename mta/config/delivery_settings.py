"""Typed settings of outbound delivery: the [delivery] table and its static routes."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from mta.config.settings import Section, TlsPolicy, UncertainMode

#: RFC 5321 4.5.3.1.8 makes servers take at least 100 recipients; few take more than 1000.
RecipientsPerTransaction = Annotated[int, Field(ge=1, le=1000)]


class RouteSection(Section):
    """A static route: mail for ``domain`` (or ``*``) goes to ``host:port``."""

    domain: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    tls: TlsPolicy = "opportunistic"
    username: str | None = None
    password: str | None = None
    #: After a lost reply to the dot: unset means ``delivery.uncertain_mode``.
    uncertain_mode: UncertainMode | None = None
    #: Recipients per SMTP transaction: unset means ``delivery.recipients_per_transaction``.
    recipients_per_transaction: RecipientsPerTransaction | None = None

    @field_validator("domain")
    @classmethod
    def _domain_or_wildcard(cls, value: str) -> str:
        if "*" in value and value != "*":
            raise ValueError(f"must be a domain name or '*', got {value!r}")
        return value

    @model_validator(mode="after")
    def _credentials_pair(self) -> RouteSection:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        return self


class DeliverySection(Section):
    """Outbound delivery: workers, routing, retries and shaping."""

    enabled: bool = True
    ehlo_name: str = ""
    batch_size: PositiveInt = 50
    lease_seconds: PositiveFloat = 300.0
    poll_interval: PositiveFloat = 5.0
    uncertain_mode: UncertainMode = "uncertain"
    #: At most this many RCPTs per transaction (Postfix's default_destination_recipient_limit).
    recipients_per_transaction: RecipientsPerTransaction = 50
    nameservers: tuple[str, ...] = ()
    dns_port: Annotated[int, Field(ge=1, le=65535)] = 53
    dns_timeout: PositiveFloat = 5.0
    mx_port: Annotated[int, Field(ge=1, le=65535)] = 25
    minimal_backoff: PositiveFloat = 300.0
    maximal_backoff: PositiveFloat = 4000.0
    max_lifetime: PositiveFloat = 5 * 86400.0
    max_connections_per_destination: PositiveInt = 20
    messages_per_minute: PositiveFloat | None = None
    global_concurrency: PositiveInt = 100
    connect_timeout: PositiveFloat = 30.0
    greeting_timeout: PositiveFloat = 300.0
    mail_timeout: PositiveFloat = 300.0
    rcpt_timeout: PositiveFloat = 300.0
    data_init_timeout: PositiveFloat = 120.0
    data_block_timeout: PositiveFloat = 180.0
    data_end_timeout: PositiveFloat = 600.0
    connection_reuse_limit: PositiveInt = 100
    connection_idle_timeout: PositiveFloat = 30.0
    crash_loop_limit: PositiveInt = 3
    crash_loop_window: PositiveFloat = 3600.0
    routes: tuple[RouteSection, ...] = ()

    @field_validator("nameservers")
    @classmethod
    def _nameservers_are_ips(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for server in value:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"{server!r} is not an IP address") from None
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliverySection:
        if self.maximal_backoff < self.minimal_backoff:
            raise ValueError("maximal_backoff must be at least minimal_backoff")
        return self
