"""Pure parts of routing: route validation and matching, grouping keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mta.config import DeliverySection, RouteSection, load_settings
from mta.delivery.routing import (
    Router,
    match_route,
    mx_key,
    normalise_domain,
    route_key,
    route_table,
)
from mta.errors import ConfigError, PermFailure, RoutePermFailure, RouteTempFailure, TempFailure


def route(domain: str, host: str, **fields: Any) -> RouteSection:
    """A static route as ``[[delivery.routes]]`` gives it."""
    return RouteSection(domain=domain, host=host, **fields)


def test_exact_domain_route_wins_over_wildcard() -> None:
    table = route_table([route("*", "smarthost"), route("Example.COM.", "direct")])
    assert match_route(table, "example.com") == route("Example.COM.", "direct")
    assert match_route(table, "other.com") == route("*", "smarthost")


def test_route_for_a_domain_does_not_cover_its_subdomains() -> None:
    table = route_table([route("example.com", "direct")])
    assert match_route(table, "sub.example.com") is None


def test_a_domain_routed_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="two static routes"):
        route_table([route("example.com", "a"), route("EXAMPLE.com.", "b")])


@pytest.mark.parametrize("kwargs", [
    {"domain": "*.example.com"},
    {"domain": ""},
    {"host": ""},
    {"port": 0},
    {"port": 65536},
    {"tls": "sometimes"},
    {"username": "relay"},
    {"password": "secret"},
])
def test_invalid_route_is_a_config_error(kwargs: dict[str, Any], tmp_path: Path) -> None:
    fields: dict[str, Any] = {"domain": "example.com", "host": "smarthost", **kwargs}
    with pytest.raises(ConfigError):
        load_settings(_config(tmp_path, "[[delivery.routes]]\n" + _toml(fields)))


@pytest.mark.parametrize("kwargs", [{"dns_timeout": 0}, {"dns_port": 0}, {"mx_port": 70000}])
def test_invalid_resolver_config_is_a_config_error(kwargs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(_config(tmp_path, "[delivery]\n" + _toml(kwargs)))


def _toml(fields: dict[str, Any]) -> str:
    return "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in fields.items())


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_route_key_names_everything_that_shapes_the_connection() -> None:
    plain = route("*", "smarthost", port=587)
    assert route_key(plain) == "route:smarthost:587/opportunistic"
    assert route_key(route("example.com", "smarthost", port=587)) == route_key(plain)
    authed = route("*", "smarthost", port=587, username="u", password="p")
    assert route_key(authed) == "route:smarthost:587/opportunistic/u"
    assert "p" not in route_key(authed).split("/")
    assert route_key(route("*", "smarthost", port=587, tls="verify")) != route_key(plain)


def test_transaction_keys_group_by_static_route_and_keep_mx_domains_apart() -> None:
    """Recipients share a transaction when one route takes them all; MX-routed domains
    each keep their own (Postfix's nexthop is the domain for MX delivery)."""
    exact = {"host": "127.0.0.1", "tls": "none"}
    only_exact = Router(DeliverySection(routes=[route("a.example", **exact)],
                                        nameservers=["127.0.0.1"]))
    assert only_exact.transaction_key("A.Example.") == only_exact.transaction_key("a.example")
    assert only_exact.transaction_key("b.example") != only_exact.transaction_key("c.example")
    assert only_exact.transaction_key("b.example") != only_exact.transaction_key("a.example")
    smarthost = Router(DeliverySection(routes=[route("*", **exact), route("a.example", **exact)],
                                       nameservers=["127.0.0.1"]))
    assert smarthost.transaction_key("b.example") == smarthost.transaction_key("c.example")
    assert smarthost.transaction_key("a.example") != smarthost.transaction_key("b.example")


def test_mx_key_does_not_depend_on_order_or_duplicates() -> None:
    assert mx_key(["mx2.example.com", "mx1.example.com", "mx2.example.com"]) == (
        "mx:mx1.example.com,mx2.example.com"
    )
    assert mx_key(["mx1.example.com", "mx2.example.com"]) == mx_key(
        ["mx2.example.com", "mx1.example.com"]
    )


def test_normalise_domain() -> None:
    assert normalise_domain(" Example.COM. ") == "example.com"


def test_route_failures_sit_in_the_error_tree() -> None:
    assert issubclass(RouteTempFailure, TempFailure)
    assert issubclass(RoutePermFailure, PermFailure)
    assert not issubclass(PermFailure, TempFailure)
    failure = RoutePermFailure("null MX (RFC 7505)", cache_for=300.0)
    assert (str(failure), failure.evidence, failure.cache_for) == (
        "null MX (RFC 7505)", "null MX (RFC 7505)", 300.0)
