"""Structured logs on stdout: JSON when not a terminal. Never bodies or credentials.

Every line is one record, written with a single write (a node's processes share
stdout): structlog's own, and those of the standard library's loggers (aiosmtpd's
``unrecognised: …`` lines, asyncio's and asyncpg's errors), whose tracebacks go inside
the record rather than across lines.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto",
                      stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stdout) at ``level``,
    one record a line."""
    out = stream or sys.stdout
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
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # aiosmtpd logs every command (and AUTH lines) at INFO: keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
