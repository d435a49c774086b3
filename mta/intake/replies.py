"""Every SMTP reply intake sends, as named constants (DESIGN.md, "Exact replies")."""

from __future__ import annotations

import re

ACCEPTED = "250 2.0.0 Ok: queued as {queue_id}"
OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Sender ok"
RECIPIENT_OK = "250 2.1.5 Recipient ok"
RESET_OK = "250 2.0.0 Reset state"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
CLOSING = "221 2.0.0 Bye"
HELP = "214 2.0.0 Commands: {commands}"

NOT_AUTHORISED = "530 5.7.0 Authentication required"
RELAY_DENIED = "554 5.7.1 Relay access denied"
MALFORMED_ADDRESS = "501 5.1.3 Bad address syntax"
NON_ASCII_ADDRESS = "553 5.6.7 Non-ASCII address requires SMTPUTF8, which is not offered"
SYNTAX_MAIL = "501 5.5.4 Syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME]"
SYNTAX_RCPT = "501 5.5.4 Syntax: RCPT TO:<address>"
SYNTAX_DATA = "501 5.5.4 Syntax: DATA"
UNKNOWN_PARAMETER = "555 5.5.4 MAIL or RCPT parameter not recognized: {name}"
NEED_HELO = "503 5.5.1 Send EHLO or HELO first"
NEED_MAIL = "503 5.5.1 Need MAIL command first"
NEED_RCPT = "503 5.5.1 Need RCPT command first"
NESTED_MAIL = "503 5.5.1 Sender already specified"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit of {limit} bytes"
LINE_TOO_LONG = "500 5.5.2 Line too long (limit {limit} octets)"
BARE_NEWLINE = "550 5.5.2 Message contains bare LF or bare CR (RFC 5321 2.3.8)"
MAIL_LOOP = "554 5.4.6 Too many Received headers: mail loop detected"
STORE_UNAVAILABLE = "451 4.3.0 Temporary failure: message not stored, try again later"
STORE_FULL = "452 4.3.1 Insufficient system storage, try again later"
NOT_ACCEPTING = "421 4.3.2 Service not available, closing transmission channel"
TOO_MANY_SESSIONS = "421 4.3.2 Too many sessions, try again later"
NODE_NOT_ACTIVE = "421 4.3.2 This node takes no new mail ({mode}), try another server"
STORE_NOT_READY = "421 4.3.2 Service not available: the store is not reachable yet"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many sessions from your address, try again later"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout exceeded, closing connection"
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands in this session"
AUTH_THROTTLED = "421 4.7.0 Too many failed authentications, try again later"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
TLS_NOT_AVAILABLE = "454 4.7.0 TLS not available"
ALREADY_TLS = "503 5.5.1 TLS already active"
START_TLS = "220 2.0.0 Ready to start TLS"
COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
AUTH_LINE_TOO_LONG = "500 5.5.2 Authentication line too long"

#: aiosmtpd's own replies that lack an enhanced status code (RFC 2034), with ours.
ENHANCED_FOR = {
    "220 Ready to start TLS": START_TLS,
    "454 TLS not available": TLS_NOT_AVAILABLE,
    "500 Command line too long": COMMAND_TOO_LONG,
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Error: strict ASCII mode": "500 5.5.2 Error: strict ASCII mode",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.2 Not enough value",
    "501 Too many values": "501 5.5.2 Too many values",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "221 Bye": "221 2.0.0 Bye",
}
INTERNAL_ERROR = "451 4.3.0 Internal error, message not accepted"

_HAS_ENHANCED = re.compile(r"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")


def with_enhanced_code(status: str) -> str:
    """``status`` with an enhanced status code: ours for aiosmtpd's known replies, else
    ``X.0.0`` by the reply's class; 1xx and 3xx replies, and those with one, unchanged."""
    if status[:1] not in ("2", "4", "5") or _HAS_ENHANCED.match(status):
        return status
    known = ENHANCED_FOR.get(status)
    if known is not None:
        return known
    if len(status) > 3 and status[3] in " -":
        return f"{status[:4]}{status[0]}.0.0 {status[4:]}"
    return f"{status[:3]} {status[0]}.0.0"
