"""Start a node inside the test's event loop, on ports the OS picks."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from mta.config import Settings
from mta.intake.listener import bind_socket
from mta.node import Node


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int, avoid: frozenset[int] = frozenset()) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1, none in ``avoid``: a node
    of several processes serves admin HTTP on its configured port plus the process index."""
    for _ in range(100):
        first = free_port()
        ports = range(first, first + count)
        if first + count > 65_536 or avoid.intersection(ports):
            continue
        sockets = [socket.socket() for _ in ports]
        try:
            for sock, port in zip(sockets, ports, strict=True):
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError(f"no run of {count} free ports found in 100 tries")


@dataclass
class NodeHandle:
    """A running in-process node and where to reach it."""

    node: Node
    port: int
    tls_port: int | None
    admin_port: int

    @property
    def settings(self) -> Settings:
        """The node's settings."""
        return self.node.settings

    async def stop(self) -> None:
        """Graceful shutdown, as on SIGTERM."""
        await self.node.stop()


async def start_node(settings: Settings) -> NodeHandle:
    """Bind on free ports, start the node, and return a handle."""
    sockets = {"plain": bind_socket("127.0.0.1:0"), "admin": bind_socket("127.0.0.1:0")}
    if settings.smtp.tls_listen:
        sockets["tls"] = bind_socket("127.0.0.1:0")
    admin_port = sockets["admin"].getsockname()[1]
    node = Node(settings, settings.database.dsn, sockets)
    await node.start()
    tls = sockets.get("tls")
    return NodeHandle(
        node=node,
        port=sockets["plain"].getsockname()[1],
        tls_port=tls.getsockname()[1] if tls else None,
        admin_port=admin_port,
    )


async def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll an async or sync predicate until true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
