"""Free listener ports for tests, and a node started inside the test's event loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mta.config import Settings
from mta.intake.listener import bind_socket
from mta.node import Node


def _listener_ports() -> Iterator[int]:
    """Ports for test listeners, below the kernel's ephemeral range so that no outgoing
    connection's source port can take one between choosing it and binding it, each handed
    out once per process, starting at a place that depends on the pid (another test run on
    the same machine starts elsewhere)."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    low, high = 10_000, min(ephemeral_low, 65_536)
    if high - low < 2_000:
        low, high = 49_152, 65_536
    span = high - low
    start = (os.getpid() * 7_919) % span
    for step in range(span):
        yield low + (start + step) % span


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORTS = _listener_ports()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never handed out before
    in this process, and outside the range the kernel takes outgoing source ports from."""
    for port in itertools.islice(_PORTS, 1_000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free listener port found in 1000 tries")


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1: a node of several
    processes serves admin HTTP on its configured port plus the process index."""
    for _ in range(100):
        ports = list(itertools.islice(_PORTS, count))
        if len(ports) < count or ports != list(range(ports[0], ports[0] + count)):
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
        return ports[0]
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
