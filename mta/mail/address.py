"""Parse SMTP envelope addresses and parameters (RFC 5321 4.1.2), strictly."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"
_MAILBOX = re.compile(rf"(?P<local>{_DOT_ATOM}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})")
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The address is malformed (501 5.1.3)."""


class ParameterError(ValueError):
    """An ESMTP parameter is malformed (501 5.5.4)."""


class NonAsciiAddress(ValueError):
    """The address holds non-ASCII characters, which need SMTPUTF8 (553 5.6.7)."""


@dataclass(frozen=True)
class PathArgument:
    """The address of MAIL FROM or RCPT TO, and its ESMTP parameters (upper-cased keys)."""

    address: str
    params: dict[str, str | None]


def parse_path(argument: str, *, allow_null: bool) -> PathArgument:
    """Parse ``<address> [params]`` after ``FROM:`` or ``TO:``.

    The null path ``<>`` is allowed only when ``allow_null``. Raises
    :class:`NonAsciiAddress`, :class:`AddressError` or :class:`ParameterError`.
    """
    text = argument.strip()
    if not text.isascii():
        raise NonAsciiAddress(argument)
    if text.startswith("<"):
        close = text.find(">")
        if close < 0:
            raise AddressError("missing '>'")
        inner, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("junk after '>'")
    else:
        inner, _, rest = text.partition(" ")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    if inner == "":
        if not allow_null:
            raise AddressError("the null path is not allowed here")
        address = ""
    else:
        match = _MAILBOX.fullmatch(inner)
        if match is None:
            raise AddressError(f"not a mailbox: {inner!r}")
        if len(match["local"]) > MAX_LOCAL or len(match["domain"]) > MAX_DOMAIN:
            raise AddressError("address part too long")
        if len(inner) > MAX_PATH - 2:
            raise AddressError("address too long")
        address = inner
    return PathArgument(address=address, params=_parse_params(rest))


def is_mailbox(address: str) -> bool:
    """Whether ``address`` is a mailbox as :func:`parse_path` accepts one (the one
    grammar intake and the DSN builder share)."""
    match = _MAILBOX.fullmatch(address)
    return (match is not None and len(match["local"]) <= MAX_LOCAL
            and len(match["domain"]) <= MAX_DOMAIN and len(address) <= MAX_PATH - 2)


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        match = _PARAM.fullmatch(word)
        if match is None:
            raise ParameterError(f"malformed parameter {word!r}")
        params[match["key"].upper()] = match["value"]
    return params
