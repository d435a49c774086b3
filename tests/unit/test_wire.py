"""The transaction wire's reply reader: replies in order, however the bytes arrive."""

from __future__ import annotations

import asyncio

import pytest

from mta.delivery.outbound.wire import MAX_REPLY_BYTES, ClosedByPeer, MalformedReply, Wire


class _Transport(asyncio.Transport):
    """Records writes; closing is all it does (the unit under test is the parser)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


def wire() -> Wire:
    return Wire.take_over(_Transport())


async def test_a_pipelined_burst_split_anywhere_yields_each_reply_in_order() -> None:
    burst = (b"250 2.0.0 reset\r\n250 2.1.0 sender ok\r\n550-5.1.1 no such\r\n"
             b"550 5.1.1 user here\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    for size in (1, 2, 7, len(burst)):
        w = wire()
        for start in range(0, len(burst), size):
            w.data_received(burst[start:start + size])
        replies = [await w.reply(1) for _ in range(5)]
        assert [(r.code, r.text) for r in replies] == [
            (250, "2.0.0 reset"), (250, "2.1.0 sender ok"),
            (550, "5.1.1 no such\n5.1.1 user here"), (250, "2.1.5 ok"), (354, "go ahead")]


async def test_a_reply_waits_for_its_last_line() -> None:
    w = wire()
    w.data_received(b"250-first\r\n")
    waiting = asyncio.ensure_future(w.reply(5))
    await asyncio.sleep(0)
    assert not waiting.done()
    w.data_received(b"250 last\r\n")
    assert (await waiting).text == "first\nlast"


async def test_replies_read_before_the_close_stay_readable_then_it_raises() -> None:
    w = wire()
    w.data_received(b"250 ok\r\n421 4.4.2 closing\r\n")
    w.eof_received()
    assert (await w.reply(1)).code == 250
    assert (await w.reply(1)).code == 421
    with pytest.raises(ClosedByPeer):
        await w.reply(1)
    assert not w.is_open
    with pytest.raises(ClosedByPeer):
        w.write(b"RSET\r\n")


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"25 short\r\n", b"250x\r\n"])
async def test_a_malformed_line_closes_the_wire(garbage: bytes) -> None:
    w = wire()
    w.data_received(garbage)
    with pytest.raises(MalformedReply, match="malformed reply line"):
        await w.reply(1)
    assert not w.is_open


async def test_an_endless_reply_is_refused_without_holding_it() -> None:
    w = wire()
    line = b"250-" + b"x" * 1000 + b"\r\n"
    for _ in range(MAX_REPLY_BYTES // len(line) + 2):
        w.data_received(line)
    with pytest.raises(MalformedReply, match="reply longer than"):
        await w.reply(1)


async def test_a_silent_server_times_out() -> None:
    with pytest.raises(TimeoutError):
        await wire().reply(0.05)


async def test_drain_waits_while_the_transport_is_full() -> None:
    w = wire()
    w.pause_writing()
    with pytest.raises(TimeoutError):
        await w.drain(0.05)
    w.resume_writing()
    await w.drain(1)
