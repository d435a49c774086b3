"""Start a node inside the test's event loop, on ports the OS picks."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from mta.config import Settings
from mta.node import Node
from mta.smtp.listener import bind_socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    sockets = {"plain": bind_socket("127.0.0.1:0")}
    if settings.smtp.tls_listen:
        sockets["tls"] = bind_socket("127.0.0.1:0")
    admin_port = free_port()
    admin = settings.admin.model_copy(update={"listen": f"127.0.0.1:{admin_port}"})
    settings = settings.model_copy(update={"admin": admin})
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
