"""Config loading: every mistake is one line naming the key; env overrides the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import (
    ServerLimits,
    budget_violation,
    connection_budget,
    load_settings,
    memory_bound_bytes,
)
from mta.config.budget import BASE_MEMORY_BYTES
from mta.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_defaults_load_without_a_file() -> None:
    settings = load_settings(None)
    assert settings.smtp.listen == "127.0.0.1:2525"
    assert settings.smtp.allowed_networks == ("127.0.0.0/8", "::1/128")
    assert settings.database.dsn == ""


def test_unknown_key_is_named(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[smtp]\nmax_recipents = 5\n"))
    assert "smtp.max_recipents: unknown key" in message
    assert "\n" not in message


def test_unknown_section_is_named(tmp_path: Path) -> None:
    assert "smpt: unknown key" in error_of(write(tmp_path, "[smpt]\nlisten = 'x'\n"))


def test_bad_type_is_named(tmp_path: Path) -> None:
    assert "node.workers:" in error_of(write(tmp_path, "[node]\nworkers = 'many'\n"))


def test_negative_limit_is_refused(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[smtp]\nmax_recipients = -1\n"))
    assert "smtp.max_recipients: Input should be greater than 0" in message


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    message = error_of(write(
        tmp_path, "[smtp]\ntls_cert_file = '/nope/cert.pem'\ntls_key_file = '/nope/key.pem'\n"
    ))
    assert "smtp.tls_cert_file: file not found: /nope/cert.pem" in message


def test_unparseable_dsn_is_refused(tmp_path: Path) -> None:
    assert "database.dsn: must be a postgresql:// URL" in error_of(
        write(tmp_path, "[database]\ndsn = 'mysql://x'\n")
    )
    assert "database.dsn: malformed port" in error_of(
        write(tmp_path, "[database]\ndsn = 'postgresql://h:notaport/db'\n")
    )


def test_bad_network_is_refused(tmp_path: Path) -> None:
    assert "'10.0.0.0/33' is not an IP network" in error_of(
        write(tmp_path, "[smtp]\nallowed_networks = ['10.0.0.0/33']\n")
    )


def test_bad_listen_address_is_refused(tmp_path: Path) -> None:
    assert "smtp.listen: port must be" in error_of(write(tmp_path, "[smtp]\nlisten = 'h:99999'\n"))


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[smtp\n"))
    assert "not valid TOML" in message and "\n" not in message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    assert "file not found" in error_of(tmp_path / "absent.toml")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTA_NODE__WORKERS", "3")
    monkeypatch.setenv("MTA_SMTP__MAX_MESSAGE_SIZE", "1MiB")
    settings = load_settings(write(tmp_path, "[node]\nworkers = 20\nintake_db_slots = 5\n"))
    assert settings.node.workers == 3
    assert settings.node.intake_db_slots == 5
    assert settings.smtp.max_message_size == 1024 * 1024


def test_pool_is_derived_from_workers_and_intake_slots(tmp_path: Path) -> None:
    settings = load_settings(write(
        tmp_path, "[node]\nworkers = 10\nintake_db_slots = 6\nprocesses = 3\n"
    ))
    budget = connection_budget(settings)
    assert budget.pool_size == 18
    assert budget.node_total == 54


def test_budget_violation_names_the_numbers(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[node]\nworkers = 90\nintake_db_slots = 8\n"))
    limits = ServerLimits(max_connections=100, superuser_reserved=3, in_use=40)
    message = budget_violation(connection_budget(settings), limits, reserve=10)
    assert message is not None
    assert "connection budget 100" in message and "87 available" in message
    fits = ServerLimits(max_connections=200, superuser_reserved=3, in_use=150)
    assert budget_violation(connection_budget(settings), fits, reserve=10) is None


def test_memory_bound_follows_data_concurrency_and_size(tmp_path: Path) -> None:
    template = "[smtp]\ndata_concurrency = {}\nmax_message_size = '1MiB'\n"
    small = load_settings(write(tmp_path, template.format(1)))
    big = load_settings(write(tmp_path, template.format(2)))
    # One copy of the message, its 1/8 of growth slack, 1 MiB of chunks, the driver's
    # copy of a body under 2 MiB, and its compressed copy (issue 13).
    assert memory_bound_bytes(big) - memory_bound_bytes(small) == (
        1024 * 1024 + 128 * 1024 + 1024 * 1024 + 1024 * 1024 + 1024 * 1024)


def test_the_compressed_copy_is_counted_only_when_compression_can_happen(
    tmp_path: Path,
) -> None:
    """Off (0), or a threshold above the size limit: no compressed copy in the bound."""
    base = "[node]\nworkers = 3\n[smtp]\ndata_concurrency = 2\nmax_message_size = '1MiB'\n"
    on = load_settings(write(tmp_path, base))
    off = load_settings(write(tmp_path, base + "[database]\ncompress_bodies_above = 0\n"))
    above = load_settings(write(tmp_path, base + "[database]\ncompress_bodies_above = '2MiB'\n"))
    assert memory_bound_bytes(on) - memory_bound_bytes(off) == (2 + 3) * 1024 * 1024
    assert memory_bound_bytes(above) == memory_bound_bytes(off)


def test_memory_bound_counts_delivery_bodies_when_delivery_runs(tmp_path: Path) -> None:
    base = "[node]\nworkers = 3\n[smtp]\nmax_message_size = '1MiB'\n"
    off = load_settings(write(tmp_path, base + "[delivery]\nenabled = false\n"))
    on = load_settings(write(tmp_path, base + "[delivery]\nenabled = true\n"))
    # Per worker: two copies of a body, and the compressed copy of one under 2 MiB.
    assert memory_bound_bytes(on) - memory_bound_bytes(off) == 3 * (2 + 1) * 1024 * 1024


def test_split_processes_are_counted_by_role(tmp_path: Path) -> None:
    """I6 and I4 per role: an intake process holds intake_db_slots + 2 connections and
    no delivery bodies, a delivery process workers + 2 and no DATA phases."""
    settings = load_settings(write(tmp_path, "[node]\nintake_processes = 2\n"
                                   "delivery_processes = 3\nworkers = 6\nintake_db_slots = 4\n"
                                   "[smtp]\nmax_message_size = '1MiB'\n"))
    assert settings.node.roles() == ("intake", "intake", "delivery", "delivery", "delivery")
    budget = connection_budget(settings)
    assert budget.pools == (6, 6, 8, 8, 8) and budget.node_total == 36
    assert budget.processes == settings.node.process_count == 5
    mib = 1024 * 1024
    intake = memory_bound_bytes(settings, "intake")
    delivery = memory_bound_bytes(settings, "delivery")
    assert delivery == BASE_MEMORY_BYTES + 6 * (2 * mib + mib)
    assert intake == BASE_MEMORY_BYTES + 16 * (mib + mib // 8 + mib + mib + mib)
    assert intake + delivery == memory_bound_bytes(settings, "both") + BASE_MEMORY_BYTES


@pytest.mark.parametrize("text, words", [
    ("[node]\nintake_processes = 1\n", "set together"),
    ("[node]\ndelivery_processes = 2\n", "set together"),
    ("[node]\nprocesses = 2\nintake_processes = 1\ndelivery_processes = 1\n", "exclusive"),
])
def test_a_half_set_split_is_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(write(tmp_path, text))
