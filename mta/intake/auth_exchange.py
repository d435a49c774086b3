"""The SMTP AUTH exchange of an intake session (PLAIN and LOGIN), the PROXY handshake
of a balancer's connection (``proxy.py``), and the session's helpers they share with the
rest of :class:`~mta.intake.protocol.IntakeSMTP`.

Every answer the client sends is hostile (I3b): bad base64, a ``*`` abort and a line
over the command reader's limit each get a reply and leave the session in step.
"""

from __future__ import annotations

import asyncio
import binascii
from base64 import b64decode, b64encode
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from mta.intake import replies
from mta.intake.policy import Intake
from mta.intake.proxy import HEADER_MISSING, ProxyOutcome

log = structlog.get_logger(__name__)

#: Reader-limit-sized chunks of one overlong AUTH line read before the session is dropped.
MAX_SKIPPED_CHUNKS = 1024


class AuthExchange(SMTP):
    """AUTH for an intake session; the session sets ``intake``."""

    intake: Intake
    #: The client's address as a balancer's PROXY header named it (``proxy.py``).
    proxied_ip: str | None = None

    async def _close_with(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    @property
    def _transport_ip(self) -> str | None:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else None

    @property
    def _peer_ip(self) -> str | None:
        return self.proxied_ip or self._transport_ip

    @property
    def client_ip(self) -> str:
        """The client's IP address as text: a balancer's PROXY header's, else the peer's."""
        return self._peer_ip or "unknown"

    async def proxy_handshake(self) -> bool:
        """Read the PROXY header a listed balancer must send first (none from other
        peers); False after closing a connection whose header is missing or wrong."""
        sources = self.intake.proxy
        peer = self._transport_ip
        if not sources.listed(peer):
            return True
        try:
            outcome = await sources.read(self._reader)
        except asyncio.CancelledError:  # aiosmtpd cancels the session at EOF
            self._refuse_proxy(ProxyOutcome(None, HEADER_MISSING, "closed before a header"),
                               peer)
            raise
        if outcome.client_ip is None:
            self._refuse_proxy(outcome, peer)
            return False
        self.proxied_ip = outcome.client_ip
        return True

    def _refuse_proxy(self, outcome: ProxyOutcome, peer: str | None) -> None:
        """Count, log and close a balancer's connection without a usable header."""
        self.intake.reject(outcome.reason or HEADER_MISSING, peer)
        log.warning("intake.proxy_refused", reason=outcome.reason, balancer=peer,
                    detail=outcome.detail)
        if self.transport is not None:
            self.transport.close()

    def _reject(self, reason: str) -> None:
        self.intake.reject(reason, self._peer_ip)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """An AUTH challenge and the client's base64 answer (bytes), or aiosmtpd's MISSING
        after a reply that ends the exchange: ``*``, bad base64, or a line over the
        command reader's limit, which is read to its end and answered ``500 5.5.2`` so
        the session stays in step. The answer is never logged."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return MISSING  # the client went away mid-exchange
        except asyncio.LimitOverrunError as exc:
            await self._skip_long_line(exc.consumed)
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        decoded = await self._decode_b64(blob.decode("ascii", "replace"))
        return MISSING if decoded is None else decoded

    async def _skip_long_line(self, consumed: int) -> None:
        """Read and drop the rest of a line longer than the reader's limit."""
        await self._reader.read(consumed)
        for _ in range(MAX_SKIPPED_CHUNKS):
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)
        raise ConnectionResetError("endless line during AUTH")

    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH, refused while the client is throttled for failures."""
        if self.intake.auth_throttle.blocked(self.client_ip):
            self._reject("auth_throttled")
            await self._close_with(replies.AUTH_THROTTLED)
            return
        if not self.intake.credentials:
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """AUTH PLAIN (RFC 4616), checked against the configured hashes."""
        blob = (await self.challenge_auth("") if len(args) == 1
                else await self._decode_b64(args[1]))
        if not isinstance(blob, bytes):
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split PLAIN credentials")
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        """AUTH LOGIN, checked against the configured hashes."""
        login = (await self.challenge_auth("Username:") if len(args) == 1
                 else await self._decode_b64(args[1]))
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(login, password)

    async def _decode_b64(self, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _check_credentials(self, login: bytes, password: bytes) -> AuthResult:
        name = login.decode("utf-8", "replace")
        if await self.intake.credentials.verify(name, password.decode("utf-8", "replace")):
            log.info("intake.auth_ok", client=self.client_ip, user=name)
            return AuthResult(success=True, auth_data=name)
        self.intake.auth_throttle.record_failure(self.client_ip)
        self._reject("auth_failed")
        return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
