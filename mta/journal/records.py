"""Journal records and their on-disk form: ``<crc32 hex> <json>\\n``, one per line."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta.errors import MtaError


class JournalError(MtaError):
    """Base of the journal's errors."""


class JournalCorrupt(JournalError):
    """A line other than a segment's last one fails its checksum or does not parse."""


class JournalLocked(JournalError):
    """Another live process holds the owner's lock."""


class JournalFull(JournalError):
    """``max_segments`` segments still hold unapplied attempts; start no new attempt."""


class JournalFailed(JournalError):
    """A write or fsync failed earlier; nothing more is accepted."""


@dataclass(frozen=True)
class DotPending:
    """The final dot of these deliveries' DATA is about to be written (I3): from now on
    the remote may have the message. Written durably right before the dot; a delivery
    leased by a dead process without one was certainly not delivered."""

    attempt_id: str
    delivery_ids: tuple[int, ...]
    message_id: str
    host: str
    at: float
    #: What a missing reply to this dot makes of the deliveries (the route's choice).
    uncertain_mode: str = "uncertain"


@dataclass(frozen=True)
class ReplyReceived:
    """The peer's reply for one delivery; code 0 means a network error (text says which)."""

    attempt_id: str
    delivery_id: int
    code: int
    text: str
    data_sent: bool
    at: float


@dataclass(frozen=True)
class Applied:
    """The store update for the attempt committed."""

    attempt_id: str
    at: float


Record = DotPending | ReplyReceived | Applied
_TAG_OF: dict[type[Record], str] = {DotPending: "dot", ReplyReceived: "reply", Applied: "applied"}
#: ``started`` records of journals written before DATA by earlier versions read as dot
#: pending: the conservative reading (their deliveries become uncertain, never resent).
_TAGS: dict[str, type[Record]] = {**{tag: cls for cls, tag in _TAG_OF.items()},
                                  "started": DotPending}


def encode(record: Record) -> bytes:
    """One journal line: CRC32 of the JSON payload, a space, the payload, a newline."""
    # The fields are flat (str, float, int and a tuple of ints): a shallow dict is the
    # same JSON as dataclasses.asdict, without its deep copy per record.
    payload = json.dumps({"t": _TAG_OF[type(record)], **vars(record)},
                         separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> Record:
    """Parse one line (without its newline); ``ValueError`` when it is not intact."""
    crc, sep, payload = line.partition(b" ")
    try:
        if not sep or len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
            raise ValueError("checksum mismatch")
        fields: dict[str, Any] = json.loads(payload)
        cls = _TAGS[fields.pop("t")]
        if cls is DotPending:
            fields["delivery_ids"] = tuple(fields["delivery_ids"])
        return cls(**fields)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"malformed record: {exc!r}") from exc


def read_segment(path: Path) -> list[Record]:
    """The records of one segment; a bad last line is a torn write and is dropped."""
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    records: list[Record] = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(decode(line))
        except ValueError as exc:
            if number == len(lines):
                break
            raise JournalCorrupt(f"{path}: line {number}: {exc}") from exc
    return records
