"""The admin HTTP server: metrics and health from process memory (I7)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mta.admin.metrics import Metrics

StatusFn = Callable[[], dict[str, Any]]


def build_admin_app(metrics: Metrics, status: StatusFn) -> web.Application:
    """``/metrics``, ``/healthz`` (the loop answers) and ``/readyz`` (accepting, store and
    journal up)."""

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **status()})

    async def readyz(_: web.Request) -> web.Response:
        state = status()
        ready = bool(state["accepting"] and state["store_up"] and state["journal_up"]
                     and not state["failing_tasks"] and state["mode"] == "active")
        return web.json_response({"ready": ready, **state}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_admin(sock: socket.socket, metrics: Metrics, status: StatusFn) -> web.AppRunner:
    """Serve the admin app on an already-bound socket; returns the runner to clean up."""
    runner = web.AppRunner(build_admin_app(metrics, status), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
