"""Envelope address parsing: strict, with the replies' error classes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.mail.address import AddressError, NonAsciiAddress, ParameterError, parse_path


@pytest.mark.parametrize("text, address", [
    ("<a@example.com>", "a@example.com"),
    ("a@example.com", "a@example.com"),
    ("<first.last+tag@sub.example.co>", "first.last+tag@sub.example.co"),
    ('<"quoted local"@example.com>', '"quoted local"@example.com'),
    ("<@relay.example:a@example.com>", "a@example.com"),
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
])
def test_valid_addresses_parse(text: str, address: str) -> None:
    assert parse_path(text, allow_null=False).address == address


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True).address == ""
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False)


@pytest.mark.parametrize("text", [
    "<a@>", "<@example.com>", "<a..b@example.com>", "<a@exa mple.com>", "<a@example.com",
    "<a@-bad.example>", "<a b@example.com>", "<>junk", "<a@example.com>junk",
    "<" + "x" * 65 + "@example.com>",
])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text, allow_null=False)


def test_non_ascii_address_is_its_own_error() -> None:
    with pytest.raises(NonAsciiAddress):
        parse_path("<jörg@example.com>", allow_null=False)


def test_parameters_are_parsed_with_upper_case_keys() -> None:
    parsed = parse_path("<a@example.com> size=100 BODY=8BITMIME", allow_null=True)
    assert parsed.params == {"SIZE": "100", "BODY": "8BITMIME"}


def test_malformed_parameter_is_refused() -> None:
    with pytest.raises(ParameterError):
        parse_path("<a@example.com> =x", allow_null=True)


@given(st.text(max_size=80))
def test_parser_raises_only_its_own_errors(text: str) -> None:
    with contextlib.suppress(AddressError, NonAsciiAddress, ParameterError):
        parse_path(text, allow_null=True)
