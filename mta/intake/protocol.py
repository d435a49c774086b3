"""The SMTP protocol for intake: aiosmtpd, with our command handlers and a bulk DATA reader.

:meth:`IntakeSMTP.smtp_DATA` reads the message with ``data_reader.read_data`` instead
of aiosmtpd's line reader. MAIL, RCPT and EHLO are ours too, for exact replies. Every
decision of policy (who may submit, limits, the commit) is the policy's (``policy.py``),
asked with plain values. The overrides lean on aiosmtpd internals (``_reader``,
``_smtp_methods``), so the version is pinned in pyproject.toml and the smuggling tests
guard the behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, _AuthMechAttr

from mta import __version__
from mta.intake import replies
from mta.intake.auth_exchange import AuthExchange
from mta.intake.data_reader import read_data
from mta.intake.policy import Intake, Submission
from mta.mail.address import AddressError, NonAsciiAddress, ParameterError, parse_path

#: The command reader's buffer limit: command lines are far shorter (512 octets).
COMMAND_READER_LIMIT = 16 * 1024
IDENT = f"mta-fleet {__version__} ESMTP"
#: Commands a client may send after the node stopped accepting: none but QUIT.
_ALWAYS_ALLOWED = frozenset({"QUIT"})


class _CommandTable:
    """What aiosmtpd's command loop looks commands up in: our guarded ``smtp_*`` methods.

    Built once per class instead of aiosmtpd's ``dir()`` per connection; each lookup
    binds the guard to the session.
    """

    __slots__ = ("_session",)
    _functions: dict[str, Callable[[Any, Any], Awaitable[None]]] = {}

    def __init__(self, session: IntakeSMTP) -> None:
        self._session = session

    @classmethod
    def names(cls) -> list[str]:
        """Every command the server knows, sorted."""
        return sorted(cls._functions)

    def get(self, name: str, default: Any = None) -> Callable[[Any], Awaitable[None]] | Any:
        """The guarded handler of command ``name``, or ``default``."""
        function = self._functions.get(name)
        if function is None:
            return default
        return partial(self._session.dispatch, name, function)


class IntakeSMTP(AuthExchange):
    """One SMTP session on the submission port.

    The constructor sets aiosmtpd's attributes itself instead of calling
    ``SMTP.__init__``, which inspects every member of the session and the handler on
    each connection; it was a fifth of the CPU time per message.
    """

    def __init__(self, intake: Intake, *, tls_context: ssl.SSLContext | None,
                 implicit_tls: bool) -> None:
        limits = intake.settings.smtp
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=COMMAND_READER_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop,
        )
        self.__ident__ = IDENT
        self.loop = loop
        self.event_handler = intake
        self.data_size_limit = int(limits.max_message_size)
        self.enable_SMTPUTF8 = True  # arguments decode as UTF-8, so we can answer 553 5.6.7
        self._decode_data = False
        self.hostname = limits.hostname
        self.tls_context = None if implicit_tls else tls_context
        self.require_starttls = False
        self._timeout_duration = limits.idle_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol: Any = None
        self._original_transport: asyncio.BaseTransport | None = None
        self.session: Any = None
        self.envelope: Any = None
        self.transport: Any = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        # Implicit TLS sessions are encrypted from the first byte.
        self._auth_require_tls = not (limits.auth_without_tls or implicit_tls)
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {
            "PLAIN": _AuthMechAttr(self.auth_PLAIN, True),
            "LOGIN": _AuthMechAttr(self.auth_LOGIN, True),
        }
        self._handle_hooks: dict[str, Any] = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = _CommandTable(self)  # type: ignore[assignment]
        self._enforce_call_limit = False
        self.command_size_limits = COMMAND_SIZE_LIMITS
        self.intake = intake
        self.max_size = int(limits.max_message_size)
        self.implicit_tls = implicit_tls
        self.commands_seen = 0

    # --- session gate -------------------------------------------------------

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the session."""
        super().connection_lost(error)
        self.intake.untrack(self)

    def _timeout_cb(self) -> None:
        """Idle too long: say so (like Postfix's 421 4.4.2), then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(replies.IDLE_TIMEOUT.encode("ascii") + b"\r\n")
            self.transport.close()

    async def _handle_client(self) -> None:
        if not await self.proxy_handshake():
            return
        refusal = self.intake.refuse_session(self.client_ip)
        if refusal is not None:
            await self.push(refusal)
            assert self.transport is not None
            self.transport.close()
            return
        self.intake.track(self, self.client_ip)
        await super()._handle_client()

    async def dispatch(self, name: str, function: Callable[[Any, Any], Awaitable[None]],
                       arg: Any) -> None:
        """Run one command, unless the node stopped accepting or the budget is spent."""
        self.commands_seen += 1
        if not self.intake.accepting and name not in _ALWAYS_ALLOWED:
            await self._close_with(replies.NOT_ACCEPTING)
            return
        if self.commands_seen > self.intake.settings.smtp.max_commands:
            self._reject("too_many_commands")
            await self._close_with(replies.TOO_MANY_COMMANDS)
            return
        await function(self, arg)

    def _reset_transaction(self) -> None:
        self._set_rset_state()  # type: ignore[no-untyped-call]

    def close_connection(self) -> None:
        """Close this session's connection (the policy's ``SessionHandle``)."""
        if self.transport is not None:
            self.transport.close()

    def _may_submit(self) -> bool:
        assert self.session is not None
        return self.intake.may_submit(authenticated=bool(self.session.authenticated),
                                      client_ip=self.client_ip)

    def _submission(self, body: bytearray) -> Submission:
        """The transaction read so far, with ``body``, as the policy commits it."""
        assert self.session is not None and self.envelope is not None
        session = self.session
        return Submission(
            mail_from=self.envelope.mail_from, recipients=tuple(self.envelope.rcpt_tos),
            body=body, client_ip=self.client_ip, helo=session.host_name or "",
            tls=self.tls_active,
            auth_user=session.auth_data if session.authenticated else None)

    @property
    def tls_active(self) -> bool:
        """True when this session is encrypted (STARTTLS or implicit TLS)."""
        return self.implicit_tls or self._tls_protocol is not None

    # --- commands -------------------------------------------------------------

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        """Refuse a command before EHLO/HELO, with an enhanced status code."""
        assert self.session is not None
        if not self.session.host_name:
            await self.push(replies.NEED_HELO)
            return True
        return False

    async def smtp_EHLO(self, hostname: str) -> None:
        """Greet and list our extensions (SMTPUTF8 is not offered)."""
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._reset_transaction()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            f"250-{self.hostname}",
            "250-PIPELINING",
            f"250-SIZE {self.max_size}",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
        ]
        if self.tls_context and not self.tls_active:
            lines.append("250-STARTTLS")
        if self.intake.credentials and (self.tls_active or not self._auth_require_tls):
            lines.append("250-AUTH PLAIN LOGIN")
        lines.append("250 HELP")
        await SMTP.push(self, "\r\n".join(lines))  # the EHLO reply carries no codes

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an error in a command: a client's fault (a failed TLS
        handshake, a connection it broke) or ours, each reported as such by the policy."""
        if isinstance(error, (TLSSetupException, ssl.SSLError)):
            return self.intake.client_fault("tls_handshake_failed", error)
        if isinstance(error, (ConnectionError, asyncio.IncompleteReadError)):
            return self.intake.client_fault("connection_broken", error)
        return self.intake.internal_error(error)

    async def push(self, status: Any) -> None:
        """Send a reply; after EHLO every 2xx, 4xx and 5xx carries an enhanced status
        code (RFC 2034), aiosmtpd's own replies included."""
        if isinstance(status, str) and self.session is not None and self.session.extended_smtp:
            status = replies.with_enhanced_code(status)
        await super().push(status)

    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS; refused inside TLS (implicit or started), which it cannot nest."""
        if self.tls_active:
            await self.push(replies.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM, with access control (I10), SIZE and BODY."""
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        refusal = self.intake.refuse_mail()
        if refusal is not None:
            await self._close_with(refusal)
            return
        if not self._may_submit():
            self._reject("not_authenticated")
            await self.push(replies.NOT_AUTHORISED)
            return
        if self.envelope.mail_from is not None:
            await self.push(replies.NESTED_MAIL)
            return
        text = _after_keyword(arg, "FROM:")
        if text is None:
            await self.push(replies.SYNTAX_MAIL)
            return
        reply = self._parse_envelope_path(text, allow_null=True)
        if isinstance(reply, str):
            await self.push(reply)
            return
        params = reply.params
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                await self.push(replies.SYNTAX_MAIL)
                return
            if int(size) > self.max_size:
                self._reject("too_big")
                await self.push(replies.MESSAGE_TOO_BIG.format(limit=self.max_size))
                return
        body = params.pop("BODY", "7BIT")
        if body is None or body.upper() not in ("7BIT", "8BITMIME"):
            await self.push(replies.SYNTAX_MAIL)
            return
        params.pop("AUTH", None)
        if params:
            await self.push(replies.UNKNOWN_PARAMETER.format(name=next(iter(params))))
            return
        self.envelope.mail_from = reply.address
        await self.push(replies.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO, with the relay check (I10) and the recipient limit."""
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if not self._may_submit():
            self._reject("relay_denied")
            await self.push(replies.RELAY_DENIED)
            return
        if self.envelope.mail_from is None:
            await self.push(replies.NEED_MAIL)
            return
        text = _after_keyword(arg, "TO:")
        if text is None:
            await self.push(replies.SYNTAX_RCPT)
            return
        reply = self._parse_envelope_path(text, allow_null=False)
        if isinstance(reply, str):
            await self.push(reply)
            return
        if reply.params:
            await self.push(replies.UNKNOWN_PARAMETER.format(name=next(iter(reply.params))))
            return
        if len(self.envelope.rcpt_tos) >= self.intake.settings.smtp.max_recipients:
            self._reject("too_many_recipients")
            await self.push(replies.TOO_MANY_RECIPIENTS)
            return
        self.envelope.rcpt_tos.append(reply.address)
        await self.push(replies.RECIPIENT_OK)

    def _parse_envelope_path(self, text: str, *, allow_null: bool) -> Any:
        try:
            return parse_path(text, allow_null=allow_null)
        except NonAsciiAddress:
            self._reject("non_ascii_address")
            return replies.NON_ASCII_ADDRESS
        except AddressError:
            self._reject("malformed_address")
            return replies.MALFORMED_ADDRESS
        except ParameterError:
            return replies.SYNTAX_MAIL if allow_null else replies.SYNTAX_RCPT

    async def smtp_RSET(self, arg: str) -> None:
        """Forget the transaction in progress."""
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._reset_transaction()
        await self.push(replies.RESET_OK)

    async def smtp_NOOP(self, arg: str) -> None:
        """Do nothing, successfully."""
        await self.push(replies.OK)

    async def smtp_HELP(self, arg: str) -> None:
        """List our commands (aiosmtpd's HELP finds none behind the guards)."""
        await self.push(replies.HELP.format(commands=" ".join(_CommandTable.names())))

    async def smtp_VRFY(self, arg: str) -> None:
        """Never confirm addresses (RFC 5321 3.5.3)."""
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_QUIT(self, arg: str) -> None:
        """Say goodbye and close."""
        await self._close_with(replies.CLOSING)

    async def smtp_DATA(self, arg: str) -> None:
        """Read the message in bulk, check it, commit it, and only then answer 250."""
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if not self._may_submit():
            await self.push(replies.NOT_AUTHORISED)
            return
        if self.envelope.mail_from is None:
            await self.push(replies.NEED_MAIL)
            return
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.SYNTAX_DATA)
            return
        async with self.intake.data_phase() as admitted:
            if admitted is not None:
                await self.push(admitted)
                self._reset_transaction()
                return
            await self.push(replies.START_DATA)
            outcome = await read_data(
                self._reader, max_size=self.max_size, on_chunk=self._reset_timeout,
                max_line=self.intake.settings.smtp.max_line_length)
            if outcome.body is None:
                assert outcome.refusal is not None and outcome.reason is not None
                self._reject(outcome.reason)
                reply = outcome.refusal
            else:
                reply = await self.intake.commit(self._submission(outcome.body))
                if reply.startswith("250"):  # max_commands counts what delivered nothing
                    self.commands_seen = 0
        self._reset_transaction()
        await self.push(reply)

def _after_keyword(arg: str | None, keyword: str) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):]


#: Command length limits; aiosmtpd's own EHLO mutates a class-level dict, ours does not.
COMMAND_SIZE_LIMITS: collections.defaultdict[str, int] = collections.defaultdict(
    lambda: 512, {"MAIL": 512 + 26 + 10 + 64}  # SIZE, BODY and AUTH parameters
)

_CommandTable._functions = {
    name.removeprefix("smtp_"): getattr(IntakeSMTP, name)
    for name in dir(IntakeSMTP) if name.startswith("smtp_")
}
