"""Bind the submission listeners: plain (with STARTTLS) and optional implicit TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping
from typing import cast

from mta.config import ProcessRole, Settings, parse_host_port
from mta.intake import replies
from mta.intake.policy import Intake
from mta.intake.protocol import IntakeSMTP


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from the configured certificate, or None without one."""
    smtp = settings.smtp
    if smtp.tls_cert_file is None or smtp.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(smtp.tls_cert_file), str(smtp.tls_key_file))
    return context


def bind_socket(address: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` that child processes can share; a port in
    use is an OSError that names the address."""
    host, port = parse_host_port(address)
    return _bind(host, port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it Nagle holds each pipelined reply until the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise OSError(exc.errno, f"{exc.strerror or exc} ({shown})") from None
    sock.setblocking(False)
    return sock


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """Bind every listener before any process starts, so a port in use stops the node at
    once with its address: ``plain`` always, ``tls`` when configured, and ``admin-I`` for
    each node process I (admin HTTP on the configured port plus I)."""
    sockets = {"plain": bind_socket(settings.smtp.listen)}
    if settings.smtp.tls_listen:
        sockets["tls"] = bind_socket(settings.smtp.tls_listen)
    host, port = parse_host_port(settings.admin.listen)
    for index in range(settings.node.process_count):
        sockets[f"admin-{index}"] = _bind(host, port + index if port else 0)
    return sockets


def process_sockets(sockets: Mapping[str, socket.socket], index: int,
                    role: ProcessRole = "both") -> dict[str, socket.socket]:
    """What node process ``index`` serves: the shared SMTP listeners (unless it only
    delivers) and, as ``admin``, its own admin HTTP socket. The sockets it does not serve
    are closed in it."""
    mine: dict[str, socket.socket] = {}
    for key, sock in sockets.items():
        if key == f"admin-{index}":
            mine["admin"] = sock
        elif key.startswith("admin-") or role == "delivery":
            sock.close()
        else:
            mine[key] = sock
    return mine


async def start_unavailable(sockets: Mapping[str, socket.socket]) -> list[asyncio.Server]:
    """Answer every SMTP connection ``421 4.3.2`` and close it (implicit TLS ones are
    closed at once), on copies of the bound sockets: closing these servers leaves the
    sockets to the real listeners."""
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: _Unavailable(greet=True),
                                        sock=sockets["plain"].dup())]
    if "tls" in sockets:
        servers.append(await loop.create_server(lambda: _Unavailable(greet=False),
                                                sock=sockets["tls"].dup()))
    return servers


class _Unavailable(asyncio.Protocol):
    """The whole SMTP service of a node whose store has not answered yet."""

    def __init__(self, *, greet: bool) -> None:
        self._greet = greet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's are not subclasses
        if self._greet:
            writer.write(replies.STORE_NOT_READY.encode("ascii") + b"\r\n")
        writer.close()


async def start_listeners(intake: Intake, settings: Settings,
                          sockets: Mapping[str, socket.socket]) -> list[asyncio.Server]:
    """Serve SMTP on already-bound sockets."""
    loop = asyncio.get_running_loop()
    context = server_tls_context(settings)
    servers = [await loop.create_server(
        lambda: IntakeSMTP(intake, tls_context=context, implicit_tls=False),
        sock=sockets["plain"],
    )]
    if "tls" in sockets:
        servers.append(await loop.create_server(
            lambda: IntakeSMTP(intake, tls_context=context, implicit_tls=True),
            sock=sockets["tls"], ssl=context,
        ))
    return servers
