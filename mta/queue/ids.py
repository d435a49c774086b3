"""Message ids: time-ordered UUIDs, shown to operators as 26-character queue ids."""

from __future__ import annotations

import random
import time
import uuid

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_DECODE = {char: value for value, char in enumerate(_ALPHABET)}


def new_message_id() -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix milliseconds, then random bits (index-friendly)."""
    millis = time.time_ns() // 1_000_000
    # The random module reseeds itself in a forked child, so processes never share ids.
    raw = bytearray(millis.to_bytes(6, "big") + random.getrandbits(80).to_bytes(10, "big"))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(raw))


def queue_id(message_id: uuid.UUID) -> str:
    """The queue id shown in replies and logs: the UUID in Crockford base32."""
    value = message_id.int
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


def parse_queue_id(text: str) -> uuid.UUID:
    """The UUID behind a queue id (or a UUID in its usual form); ValueError if neither."""
    cleaned = text.strip().upper()
    if len(cleaned) == 26 and all(char in _DECODE for char in cleaned):
        value = 0
        for char in cleaned:
            value = (value << 5) | _DECODE[char]
        if value >> 128:
            raise ValueError(f"not a queue id: {text!r}")
        return uuid.UUID(int=value)
    return uuid.UUID(text)
