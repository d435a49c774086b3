"""The admin HTTP server: health and metrics from process memory (I7), and the node's API.

``/metrics``, ``/healthz`` and ``/readyz`` are open (Prometheus, load balancers).
``/v1/*`` needs ``Authorization: Bearer <token>`` with one of ``admin.token`` (several may
be listed, so a token can be rotated without downtime): a missing token gets 401, a wrong
one 403 (compared in constant time), and a node with no token configured answers 403.
"""

from __future__ import annotations

import hmac
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mta.admin.metrics import Metrics

#: The modes ``POST /v1/state`` takes.
MODES = ("active", "draining", "isolated")


class AdminTarget(Protocol):
    """What the admin server asks of its node."""

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` and ``/readyz`` report, from memory only."""

    async def state(self) -> dict[str, Any]:
        """The node's mode, why, by whom and since when."""

    async def set_state(self, mode: str, reason: str, by: str,
                        term: int | None = None) -> dict[str, Any]:
        """Set the node's mode (in its store, audited; a controller's ``term`` fences
        it) and return the new state."""

    async def queue(self) -> dict[str, Any]:
        """Counts by state and destination, the oldest age, the journal backlog."""

    async def reconcile(self, by: str, reason: str) -> dict[str, Any]:
        """Recover the node's dead processes; what is delivered, not, and uncertain."""


def build_admin_app(metrics: Metrics, node: AdminTarget,
                    tokens: Sequence[str] = ()) -> web.Application:
    """The admin routes; see the module docstring."""

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **node.status()})

    async def readyz(_: web.Request) -> web.Response:
        state = node.status()
        # A delivery-only process takes no SMTP: it is ready when it can deliver.
        takes_mail = state["accepting"] or state.get("role") == "delivery"
        ready = bool(takes_mail and state["store_up"] and state["journal_up"]
                     and not state["failing_tasks"] and state["mode"] == "active")
        return web.json_response({"ready": ready, **state}, status=200 if ready else 503)

    async def get_state(_: web.Request) -> web.Response:
        return web.json_response(await node.state())

    async def post_state(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        mode, reason, by = body.get("mode"), body.get("reason"), body.get("by")
        if mode not in MODES:
            return _error(400, f"mode must be one of {', '.join(MODES)}")
        if not isinstance(reason, str) or not reason.strip():
            return _error(400, "reason is required (it goes into the audit trail)")
        if not isinstance(by, str) or not by.strip():
            return _error(400, "by is required: who asks (it goes into the audit trail)")
        term = body.get("term")
        if term is not None and (type(term) is not int or term < 0):
            return _error(400, "term must be a non-negative integer (a controller's)")
        return web.json_response(await node.set_state(mode, reason.strip(), by.strip(), term))

    async def get_queue(_: web.Request) -> web.Response:
        return web.json_response(await node.queue())

    async def post_reconcile(request: web.Request) -> web.Response:
        body: Any = {}
        if await request.read():
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _error(400, "the body must be a JSON object (or empty)")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object (or empty)")
        by, reason = body.get("by", "admin-api"), body.get("reason", "")
        if not isinstance(by, str) or not by.strip() or not isinstance(reason, str):
            return _error(400, "by and reason, when given, must be strings (by not empty)")
        return web.json_response(await node.reconcile(by.strip(), reason.strip()))

    app = web.Application(middlewares=[_bearer(tokens, metrics)])
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/state", get_state)
    app.router.add_post("/v1/state", post_state)
    app.router.add_get("/v1/queue", get_queue)
    app.router.add_post("/v1/reconcile", post_reconcile)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bearer(tokens: Sequence[str], metrics: Metrics) -> Any:
    """Middleware: ``/v1/*`` only with one of ``tokens`` (401 missing, 403 wrong or none)."""
    known = [token.encode() for token in tokens if token]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not offered.strip():
            metrics.admin_auth_failures.labels("missing").inc()
            return _error(401, "a bearer token is required",
                          headers={"WWW-Authenticate": "Bearer"})
        given = offered.strip().encode()
        matches = [hmac.compare_digest(given, token) for token in known]  # all, always
        if not any(matches):
            metrics.admin_auth_failures.labels("wrong" if known else "none_configured").inc()
            return _error(403, "the token is not accepted" if known
                          else "no admin token is configured on this node")
        return await handler(request)

    return check


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def start_admin(sock: socket.socket, metrics: Metrics, node: AdminTarget,
                      tokens: Sequence[str] = (),
                      tls: ssl.SSLContext | None = None) -> web.AppRunner:
    """Serve the admin app on an already-bound socket (HTTPS only with ``tls``); returns
    the runner to clean up."""
    runner = web.AppRunner(build_admin_app(metrics, node, tokens), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=tls).start()
    return runner
