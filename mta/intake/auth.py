"""Submission credentials: scrypt hashes, verification off the event loop, throttling."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from collections import deque
from collections.abc import Iterable

from mta.config import User

_N, _R, _P = 2**14, 8, 1
_DKLEN = 32


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash a password as ``$scrypt$n=…,r=…,p=…$salt$hash`` (what ``mta user hash`` prints)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"$scrypt$n={_N},r={_R},p={_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a hash from :func:`hash_password`; False on any mismatch."""
    try:
        _, scheme, params, salt_text, digest_text = encoded.split("$")
        if scheme != "scrypt":
            return False
        cost = dict(item.split("=") for item in params.split(","))
        salt, expected = _unb64(salt_text), _unb64(digest_text)
        actual = hashlib.scrypt(
            password.encode(), salt=salt, n=int(cost["n"]), r=int(cost["r"]),
            p=int(cost["p"]), dklen=len(expected), maxmem=128 * 1024 * 1024,
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


class Credentials:
    """The configured users; verification runs in a thread so the loop keeps serving."""

    def __init__(self, users: Iterable[User]) -> None:
        self._hashes = {user.name: user.password_hash for user in users}
        # An unknown user costs as much as a known one, so timing reveals nothing.
        self._decoy = hash_password("decoy")

    def __bool__(self) -> bool:
        return bool(self._hashes)

    async def verify(self, name: str, password: str) -> bool:
        """True when ``name`` exists and ``password`` matches its hash."""
        encoded = self._hashes.get(name)
        ok = await asyncio.to_thread(verify_password, password, encoded or self._decoy)
        return ok and encoded is not None


class AuthThrottle:
    """Counts failed AUTH per client IP in a sliding window, with a bounded table."""

    def __init__(self, limit: int, window_s: float, max_clients: int = 10_000) -> None:
        self._limit = limit
        self._window = window_s
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        stamps = self._failures.get(client)
        if stamps is None:
            return deque()
        while stamps and now - stamps[0] > self._window:
            stamps.popleft()
        if not stamps:
            del self._failures[client]
        return stamps

    def blocked(self, client: str) -> bool:
        """True once ``client`` failed ``limit`` times within the window."""
        return len(self._recent(client, time.monotonic())) >= self._limit

    def record_failure(self, client: str) -> None:
        """Count one failed AUTH from ``client``."""
        now = time.monotonic()
        stamps = self._recent(client, now)
        if client not in self._failures:
            if len(self._failures) >= self._max_clients:
                self._failures.pop(next(iter(self._failures)))
            self._failures[client] = stamps
        stamps.append(now)
