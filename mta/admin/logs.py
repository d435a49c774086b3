"""Structured logs on stdout: JSON when not a terminal. Never bodies or credentials.

Every line is one record, written with a single write (a node's processes share
stdout): structlog's own, and those of the standard library's loggers (aiosmtpd's
``unrecognised: …`` lines, asyncio's and asyncpg's errors), whose tracebacks go inside
the record rather than across lines.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


#: An e-mail address inside a logged value (a sender, a recipient, a remote reply).
_ADDRESS = re.compile(r"([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
#: Values that look like addresses but are identifiers, kept as they are.
_NOT_ADDRESSES = frozenset({"event", "message_id", "queue_id", "original_queue_id", "level",
                            "timestamp", "logger", "owner", "identity"})


def hash_local_part(match: re.Match[str]) -> str:
    """``local@domain`` as ``h-<hash of local>@domain``: the same address, the same hash."""
    digest = hashlib.sha256(match[1].encode("utf-8", "replace")).hexdigest()[:10]
    return f"h-{digest}@{match[2]}"


def _hash_addresses(_: object, __: str, event: MutableMapping[str, Any]
                    ) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if key in _NOT_ADDRESSES:
            continue
        if isinstance(value, str) and "@" in value:
            event[key] = _ADDRESS.sub(hash_local_part, value)
        elif isinstance(value, list | tuple) and any(isinstance(v, str) for v in value):
            event[key] = [_ADDRESS.sub(hash_local_part, v) if isinstance(v, str) else v
                          for v in value]
    return event


def configure_logging(level: str = "info", fmt: str = "auto",
                      stream: TextIO | None = None, *, addresses: str = "hashed",
                      node: str | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stdout) at ``level``,
    one record a line; every record names ``node`` when given, and addresses keep only
    their domain unless ``addresses`` is ``full``."""
    out = stream or sys.stdout
    if node is not None:
        structlog.contextvars.bind_contextvars(node=node)
    json_output = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            *([] if addresses == "full" else [_hash_addresses]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (PrintLogger writes the newline separately): the processes
        # of a node share stdout, and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)  # one write per record, newline included
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    *([] if addresses == "full" else [_hash_addresses]), renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # aiosmtpd logs every command (and AUTH lines) at INFO: keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
