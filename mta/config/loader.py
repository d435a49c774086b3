"""Load node settings from a TOML file with ``MTA_…`` environment overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mta.config.delivery_settings import DeliverySection
from mta.config.settings import (
    AdminSection,
    AdmissionSection,
    DatabaseSection,
    DedupSection,
    LogSection,
    NodeSection,
    RetentionSection,
    SmtpSection,
    User,
    parse_host_port,
)
from mta.errors import ConfigError


class Settings(BaseSettings):
    """The whole node configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="MTA_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSection = Field(default_factory=NodeSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    smtp: SmtpSection = Field(default_factory=SmtpSection)
    admission: AdmissionSection = Field(default_factory=AdmissionSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    delivery: DeliverySection = Field(default_factory=DeliverySection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    admin: AdminSection = Field(default_factory=AdminSection)
    log: LogSection = Field(default_factory=LogSection)
    users: tuple[User, ...] = ()

    @property
    def ehlo_name(self) -> str:
        """The name delivery gives in EHLO and as the reporting MTA of its DSNs."""
        return self.delivery.ehlo_name or self.smtp.hostname

    @model_validator(mode="after")
    def _admin_ports_fit(self) -> Settings:
        _, port = parse_host_port(self.admin.listen)
        last = port + self.node.process_count - 1
        if port and last > 65_535:
            raise ValueError(f"admin.listen: node process {self.node.process_count - 1} would "
                             f"serve admin HTTP on port {last}, past 65535 (each process "
                             "uses the configured port plus its index)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables override the file (passed as init values)."""
        return (env_settings, init_settings)


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file ``path`` as a dict; ``ConfigError`` with one line otherwise."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """Render pydantic's errors as ``key: problem`` on one line, separated by ``; ``."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (if given), apply environment overrides and validate."""
    values = read_toml(path) if path is not None else {}
    try:
        return Settings(**values)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + describe_validation_error(exc)) from None
