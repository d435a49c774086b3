"""Ids, password hashes, header inspection and the query file."""

from __future__ import annotations

import pytest

from mta.intake.auth import AuthThrottle, hash_password, verify_password
from mta.intake.trace import (
    TraceContext,
    inspect_headers,
    message_id_header,
    received_header,
)
from mta.queue.ids import new_message_id, parse_queue_id, queue_id
from mta.queue.sql import parse_queries, queries


def test_queue_ids_round_trip_and_sort_by_time() -> None:
    ids = [new_message_id() for _ in range(50)]
    for message_id in ids:
        text = queue_id(message_id)
        assert len(text) == 26
        assert parse_queue_id(text) == message_id
        assert parse_queue_id(text.lower()) == message_id
    assert parse_queue_id(str(ids[0])) == ids[0]
    assert ids[0].version == 7


def test_queue_id_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_queue_id("not-an-id")


def test_password_hash_verifies_only_the_right_password() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("$scrypt$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("S3cret", encoded)
    assert not verify_password("s3cret", "$scrypt$garbage")
    assert hash_password("s3cret") != encoded, "salted"


def test_auth_throttle_blocks_after_the_limit() -> None:
    throttle = AuthThrottle(limit=3, window_s=60)
    for _ in range(2):
        throttle.record_failure("192.0.2.1")
    assert not throttle.blocked("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    assert throttle.blocked("192.0.2.1")
    assert not throttle.blocked("192.0.2.2")


def test_auth_throttle_table_is_bounded() -> None:
    throttle = AuthThrottle(limit=1, window_s=60, max_clients=10)
    for i in range(100):
        throttle.record_failure(f"192.0.2.{i}")
    assert sum(throttle.blocked(f"192.0.2.{i}") for i in range(100)) == 10


def test_inspect_headers_counts_received_and_reads_message_id() -> None:
    body = (b"Received: from a\r\nreceived : from b\r\nMessage-ID:\r\n <x@y>\r\n"
            b"Subject: s\r\n\r\nReceived: in the body does not count\r\n")
    facts = inspect_headers(body)
    assert facts.received_count == 2
    assert facts.message_id == "<x@y>"
    assert inspect_headers(b"\r\nReceived: x\r\n").received_count == 0


def test_received_header_names_protocol_and_single_recipient() -> None:
    ctx = TraceContext(helo="client.test", client_ip="127.0.0.1", hostname="mx.test",
                       tls=True, authenticated=True, queue_id="QID", recipients=("a@b.c",))
    header = received_header(ctx)
    assert header.startswith("Received: from client.test ([127.0.0.1])\r\n\tby mx.test")
    assert "with ESMTPSA id QID" in header and "for <a@b.c>" in header
    assert header.endswith("\r\n")
    two = TraceContext(**{**ctx.__dict__, "recipients": ("a@b.c", "d@e.f"), "tls": False,
                          "authenticated": False})
    assert "for <" not in received_header(two) and "with ESMTP id" in received_header(two)


def test_message_id_header_uses_queue_id_and_hostname() -> None:
    header, value = message_id_header("QID", "mx.test")
    assert value == "<QID@mx.test>" and header == "Message-ID: <QID@mx.test>\r\n"


def test_query_file_parses_and_rejects_duplicates() -> None:
    assert "delivery_claim_due" in queries()
    assert "SKIP LOCKED" in queries()["delivery_claim_due"]
    with pytest.raises(ValueError):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


def test_has_long_line_finds_exactly_the_lines_over_the_limit() -> None:
    from mta.intake.data_reader import has_long_line

    def body(*lengths: int) -> bytearray:
        return bytearray(b"\r\n" + b"".join(b"x" * n + b"\r\n" for n in lengths))

    assert not has_long_line(body(998, 10, 998), 998)
    assert has_long_line(body(10, 999, 10), 998)
    assert has_long_line(body(5000), 998)
    assert not has_long_line(body(*([80] * 20_000)), 998)
    for limit in (78, 79, 100, 998):
        for length in range(limit - 3, limit + 4):
            for offset in range(0, 7):
                data = body(offset, length, 3)
                assert has_long_line(data, limit) == (length > limit), (limit, length, offset)
