"""The outbound SMTP client against the recording sink on loopback: results and reuse."""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import AsyncIterator

import pytest
import trustme

from mta.config import DeliverySection, TlsPolicy
from mta.delivery.outbound.cache import ConnectionCache
from mta.delivery.outbound.session import OutboundConnection
from mta.delivery.outbound.transaction import SETUP_PHASES, RecipientResult, Transaction
from mta.delivery.routing import MailHost, NextHop
from tests.support.bad_peer import BadPeer, running_bad_peer
from tests.support.nodes import free_port
from tests.support.sink import Faults, Sink, running_sink

SENDER = "sender@origin.test"
QUICK = DeliverySection(connect_timeout=5, greeting_timeout=5, mail_timeout=5,
                        rcpt_timeout=5, data_init_timeout=5, data_block_timeout=5,
                        data_end_timeout=5)


def hop(sink: Sink, tls: TlsPolicy = "none", username: str | None = None,
        password: str | None = None) -> NextHop:
    """A static route to the sink."""
    return NextHop(key=f"route:127.0.0.1:{sink.port}/{tls}",
                   hosts=(MailHost("127.0.0.1", ("127.0.0.1",), 0),), port=sink.port, tls=tls,
                   source="route", expires_at=math.inf, username=username, password=password)


def message(message_id: str, size: int = 200) -> bytes:
    """A CRLF message with ``message_id`` and a body of about ``size`` bytes."""
    body = b"".join(b"line %05d of the body\r\n" % i for i in range(size // 23 + 1))
    return f"Message-ID: <{message_id}>\r\nSubject: test\r\n\r\n".encode() + body


def transaction(message_id: str, *recipients: str, size: int = 200) -> Transaction:
    """A transaction from ``SENDER`` to ``recipients`` (default one)."""
    return Transaction(SENDER, recipients or ("r@dest.test",), message(message_id, size))


async def nothing() -> None:
    """A ``before_data`` that journals nothing."""


def connection(sink: Sink, tls: TlsPolicy = "none", timeouts: DeliverySection = QUICK,
               **kwargs: object) -> OutboundConnection:
    """A not yet connected session to the sink."""
    return OutboundConnection(hop(sink, tls), ehlo_name="relay.origin.test",
                              timeouts=timeouts, **kwargs)  # type: ignore[arg-type]


async def send_once(sink: Sink, tx: Transaction, tls: TlsPolicy = "none",
                    timeouts: DeliverySection = QUICK, **kwargs: object) -> list[RecipientResult]:
    """One transaction on a fresh connection, closed afterwards."""
    conn = connection(sink, tls, timeouts, **kwargs)
    try:
        return await conn.send(tx, before_data=nothing)
    finally:
        await conn.close()


async def test_delivery_records_the_2xx_reply_as_evidence() -> None:
    async with running_sink() as sink:
        (result,) = await send_once(sink, transaction("ok@origin.test"))
        assert result == RecipientResult("r@dest.test", 250, "2.0.0 Ok: received", "data_end",
                                         True)
        assert not result.uncertain
        (record,) = sink.transactions
        assert record.data == message("ok@origin.test")
        assert (record.mail_from, record.tls) == (SENDER, False)


async def test_all_recipients_of_a_message_share_one_transaction() -> None:
    recipients = [f"r{i}@dest.test" for i in range(20)]
    async with running_sink() as sink:
        results = await send_once(sink, transaction("many@origin.test", *recipients))
        assert [r.recipient for r in results] == recipients
        assert {(r.code, r.phase) for r in results} == {(250, "data_end")}
        (record,) = sink.transactions
        assert record.recipients == tuple(recipients)
        assert sink.connections == 1


async def test_rcpt_rejection_fails_one_recipient_and_delivers_the_others() -> None:
    faults = Faults(reject={"bad@dest.test": "550 5.1.1 no such user"})
    async with running_sink(faults=faults) as sink:
        good, bad, other = await send_once(
            sink, transaction("rej@origin.test", "good@dest.test", "bad@dest.test",
                              "other@dest.test"))
        assert bad == RecipientResult("bad@dest.test", 550, "5.1.1 no such user", "rcpt", False)
        assert (good.code, other.code) == (250, 250)
        (record,) = sink.transactions
        assert record.recipients == ("good@dest.test", "other@dest.test")


async def test_an_address_that_is_not_a_mailbox_never_reaches_a_command_line() -> None:
    """A control character, a line break or non-ASCII in a stored address fails that
    recipient locally; the sink sees only the others' RCPTs."""
    bad = ["a\x01b@dest.test", "c@dest.test\r\nRSET", "ü@dest.test"]
    async with running_sink() as sink:
        results = await send_once(sink, transaction("bad@origin.test", *bad, "good@dest.test"))
        by_rcpt = {r.recipient: r for r in results}
        for rcpt in bad:
            assert (by_rcpt[rcpt].code, by_rcpt[rcpt].phase) == (0, "rcpt"), rcpt
            assert "address not sendable" in by_rcpt[rcpt].text
        assert by_rcpt["good@dest.test"].code == 250
        (record,) = sink.transactions
        assert record.recipients == ("good@dest.test",)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_every_rcpt_rejected_sends_no_data_and_keeps_the_session(
    pipelining: bool,
) -> None:
    """Pipelined, the group (and so ``before_data``, the body read)
    goes out before the RCPT replies are known; lock-step, ``before_data`` waits for an
    accepted recipient. Either way no content is sent and the next transaction works."""
    faults = Faults(reject={"bad@dest.test": "450 4.2.0 mailbox busy"})
    called: list[bool] = []

    async def before_data() -> None:
        called.append(True)

    async with running_sink(faults=faults, pipelining=pipelining) as sink:
        conn = connection(sink)
        (result,) = await conn.send(transaction("none@origin.test", "bad@dest.test"),
                                    before_data=before_data)
        assert (result.code, result.phase, result.data_sent) == (450, "rcpt", False)
        assert called == ([True] if pipelining else [])
        assert conn.reusable and sink.transactions == []
        (after,) = await conn.send(transaction("next@origin.test", "good@dest.test"),
                                   before_data=nothing)
        assert (after.code, after.phase) == (250, "data_end")
        await conn.close()
        assert sink.connections == 1 and len(sink.transactions) == 1


async def test_4xx_at_data_end_is_a_recorded_reply_not_uncertain() -> None:
    async with running_sink(faults=Faults(tempfail=1.0)) as sink:
        results = await send_once(sink, transaction("tf@origin.test", "a@dest.test",
                                                    "b@dest.test"))
        for result in results:
            assert (result.code, result.text) == (451, "4.3.0 Sink: try again later")
            assert (result.phase, result.data_sent, result.uncertain) == ("data_end", True,
                                                                          False)


async def test_drop_mid_data_is_reported_as_data_sent() -> None:
    faults = Faults(drop_mid_data=1.0, drop_after_bytes=100)
    async with running_sink(faults=faults) as sink:
        conn = connection(sink)
        (result,) = await conn.send(transaction("cut@origin.test", size=200_000),
                                    before_data=nothing)
        assert (result.code, result.phase, result.data_sent) == (0, "data_end", True)
        assert result.uncertain
        assert not conn.reusable
        assert sink.transactions == []


async def test_a_break_noticed_before_the_dot_is_certainly_not_delivered() -> None:
    """I3: the server dropped the connection mid-content and the client notices it
    before writing the dot (the content is far larger than the socket buffers): the
    server discarded the unfinished transaction, so nothing is uncertain."""
    faults = Faults(drop_mid_data=1.0, drop_after_bytes=100)
    dots: list[list[str]] = []

    async def before_dot(accepted: list[str]) -> None:
        dots.append(accepted)

    async with running_sink(faults=faults) as sink:
        conn = connection(sink)
        (result,) = await conn.send(transaction("big@origin.test", size=16 * 1024 * 1024),
                                    before_data=nothing, before_dot=before_dot)
        assert (result.code, result.phase, result.data_sent) == (0, "data", False), result
        assert not result.uncertain
        assert dots == [], "the dot-pending record is written only right before the dot"
        assert not conn.reusable
        assert sink.transactions == []


async def test_drop_after_the_dot_is_uncertain() -> None:
    async with running_sink(faults=Faults(drop_after_dot=1.0)) as sink:
        (result,) = await send_once(sink, transaction("dot@origin.test"))
        assert (result.code, result.phase, result.uncertain) == (0, "data_end", True)
        assert "reply to end of data" in result.text
        (record,) = sink.transactions
        assert record.dropped_after_dot


async def test_hung_data_end_times_out_within_the_data_end_timeout() -> None:
    timeouts = QUICK.model_copy(update={"data_end_timeout": 0.3})
    async with running_sink(faults=Faults(hang=True)) as sink:
        started = time.monotonic()
        (result,) = await send_once(sink, transaction("hang@origin.test"), timeouts=timeouts)
        elapsed = time.monotonic() - started
        assert result == RecipientResult(
            "r@dest.test", 0, "timeout waiting for reply to end of data after 0.3 s",
            "data_end", True)
        assert 0.3 <= elapsed < 3
        (record,) = sink.transactions
        assert record.hung


async def test_silent_server_fails_at_greeting_without_calling_before_data() -> None:
    timeouts = DeliverySection(connect_timeout=5, greeting_timeout=0.3)
    called: list[bool] = []

    async def before_data() -> None:
        called.append(True)

    async with running_sink(faults=Faults(greet=False)) as sink:
        conn = connection(sink, timeouts=timeouts)
        (result,) = await conn.send(transaction("silent@origin.test"), before_data=before_data)
        assert (result.code, result.phase, result.data_sent) == (0, "greeting", False)
        assert "greeting" in result.text
        assert called == []
        assert not conn.reusable


async def test_connect_refused_is_reported_at_connect() -> None:
    async with running_sink() as sink:
        closed = hop(sink)
    conn = OutboundConnection(closed, ehlo_name="relay.origin.test", timeouts=QUICK)
    (result,) = await conn.send(transaction("refused@origin.test"), before_data=nothing)
    assert (result.code, result.phase, result.data_sent) == (0, "connect", False)


async def test_before_data_is_awaited_before_any_content_reaches_the_sink() -> None:
    journaled: list[float] = []
    async with running_sink() as sink:

        async def before_data() -> None:
            assert sink.transactions == []
            journaled.append(time.monotonic())

        conn = connection(sink)
        (result,) = await conn.send(transaction("order@origin.test"), before_data=before_data)
        await conn.close()
        assert result.code == 250
        (record,) = sink.transactions
        assert len(journaled) == 1
        assert journaled[0] < record.received_at


async def test_failing_before_data_sends_nothing() -> None:
    async def before_data() -> None:
        raise RuntimeError("journal full")

    async with running_sink() as sink:
        conn = connection(sink)
        results = await conn.send(transaction("nojournal@origin.test", "a@dest.test",
                                              "b@dest.test"), before_data=before_data)
        for result in results:
            assert (result.code, result.phase, result.data_sent) == (0, "data", False)
            assert "journal full" in result.text
        (again,) = await conn.send(transaction("next@origin.test"), before_data=nothing)
        await conn.close()
        assert again.code == 250
        assert sink.received_ids() == {"next@origin.test"}


async def test_streamed_content_is_dot_stuffed_across_chunk_boundaries() -> None:
    chunks = [b"Message-ID: <s@origin.test>\r\n\r\n.lead\r", b"\n", b".", b"dot\rbare cr\n",
              b"", b"..two\r\nno final newline"]

    async def content() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async with running_sink() as sink:
        (result,) = await send_once(sink, Transaction(SENDER, ["r@dest.test"], content()))
        assert result.code == 250
        (record,) = sink.transactions
        assert record.data == (b"Message-ID: <s@origin.test>\r\n\r\n.lead\r\n.dot\r\nbare cr"
                               b"\r\n..two\r\nno final newline\r\n")


async def test_cached_connection_carries_several_transactions() -> None:
    async with running_sink() as sink:
        cache = ConnectionCache(QUICK, ehlo_name="relay.origin.test")
        for name in ("one", "two"):
            async with cache.session(hop(sink)) as conn:
                (result,) = await conn.send(transaction(f"{name}@origin.test"),
                                            before_data=nothing)
                assert result.code == 250
        assert len(cache) == 1
        await cache.close()
        assert sink.connections == 1
        assert [t.message_id for t in sink.transactions] == ["one@origin.test",
                                                             "two@origin.test"]


async def test_max_messages_per_connection_opens_a_new_connection() -> None:
    async with running_sink() as sink:
        cache = ConnectionCache(QUICK.model_copy(update={"connection_reuse_limit": 2}),
                                ehlo_name="relay.origin.test")
        for i in range(5):
            async with cache.session(hop(sink)) as conn:
                (result,) = await conn.send(transaction(f"m{i}@origin.test"),
                                            before_data=nothing)
                assert result.code == 250
                assert conn.messages_sent <= 2
        await cache.close()
        assert sink.connections == 3
        assert sink.deliveries() == 5


async def test_idle_connection_past_max_idle_is_not_reused() -> None:
    now = [0.0]
    async with running_sink() as sink:
        cache = ConnectionCache(QUICK.model_copy(update={"connection_idle_timeout": 30}),
                                ehlo_name="relay.origin.test",
                                clock=lambda: now[0])
        for i, advance in enumerate((0.0, 29.0, 31.0)):
            now[0] += advance
            async with cache.session(hop(sink)) as conn:
                await conn.send(transaction(f"i{i}@origin.test"), before_data=nothing)
        await cache.close()
        assert sink.connections == 2
        assert sink.deliveries() == 3


async def test_failed_connection_is_discarded() -> None:
    async with running_sink(faults=Faults(drop_after_dot=1.0)) as sink:
        cache = ConnectionCache(QUICK, ehlo_name="relay.origin.test")
        async with cache.session(hop(sink)) as conn:
            (result,) = await conn.send(transaction("lost@origin.test"), before_data=nothing)
            assert result.uncertain
        assert len(cache) == 0
        sink.faults = Faults()
        async with cache.session(hop(sink)) as conn:
            (result,) = await conn.send(transaction("fine@origin.test"), before_data=nothing)
            assert result.code == 250
        await cache.close()
        assert sink.connections == 2


async def test_cache_size_is_bounded() -> None:
    async with running_sink() as sink, running_sink() as other:
        cache = ConnectionCache(QUICK, ehlo_name="relay.origin.test", max_cached=1)
        async with cache.session(hop(sink)) as first, cache.session(hop(other)) as second:
            await first.send(transaction("a@origin.test"), before_data=nothing)
            await second.send(transaction("b@origin.test"), before_data=nothing)
        assert len(cache) == 1
        await cache.close()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 signed by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_opportunistic_tls_is_used_when_offered(server_tls: ssl.SSLContext) -> None:
    async with running_sink(tls_context=server_tls) as sink:
        conn = connection(sink, "opportunistic")
        (result,) = await conn.send(transaction("tls@origin.test"), before_data=nothing)
        await conn.close()
        assert result.code == 250
        assert conn.tls
        (record,) = sink.transactions
        assert record.tls


async def test_opportunistic_tls_sends_plain_when_not_offered() -> None:
    async with running_sink() as sink:
        (result,) = await send_once(sink, transaction("plain@origin.test"), "opportunistic")
        assert result.code == 250
        (record,) = sink.transactions
        assert not record.tls


async def test_required_tls_fails_when_not_offered() -> None:
    async with running_sink() as sink:
        (result,) = await send_once(sink, transaction("req@origin.test"), "required")
        assert (result.code, result.phase, result.data_sent) == (0, "starttls", False)
        assert "does not offer STARTTLS" in result.text
        assert sink.transactions == []


async def test_verify_fails_on_an_untrusted_certificate(server_tls: ssl.SSLContext) -> None:
    async with running_sink(tls_context=server_tls) as sink:
        (result,) = await send_once(sink, transaction("untrusted@origin.test"), "verify",
                                    tls_context=trusting(trustme.CA()))
        assert (result.code, result.phase, result.data_sent) == (0, "starttls", False)
        assert sink.transactions == []


async def test_verify_succeeds_with_the_trusted_ca(ca: trustme.CA,
                                                   server_tls: ssl.SSLContext) -> None:
    async with running_sink(tls_context=server_tls) as sink:
        (result,) = await send_once(sink, transaction("trusted@origin.test"), "verify",
                                    tls_context=trusting(ca))
        assert result.code == 250
        (record,) = sink.transactions
        assert record.tls


async def test_auth_runs_after_starttls(server_tls: ssl.SSLContext) -> None:
    async with running_sink(tls_context=server_tls, credentials={"relay": "s3cret"}) as sink:
        conn = OutboundConnection(hop(sink, "opportunistic", "relay", "s3cret"),
                                  ehlo_name="relay.origin.test", timeouts=QUICK)
        (result,) = await conn.send(transaction("auth@origin.test"), before_data=nothing)
        await conn.close()
        assert result.code == 250
        (record,) = sink.transactions
        assert (record.auth_user, record.tls) == ("relay", True)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_auth_is_refused_locally_without_tls() -> None:
    async with running_sink(credentials={"relay": "s3cret"}) as sink:
        conn = OutboundConnection(hop(sink, "opportunistic", "relay", "s3cret"),
                                  ehlo_name="relay.origin.test", timeouts=QUICK)
        (result,) = await conn.send(transaction("noauth@origin.test"), before_data=nothing)
        assert (result.code, result.phase, result.data_sent) == (0, "auth", False)
        assert sink.transactions == []


def two_hosts(sink: Sink, primary: str = "127.0.0.2",
              secondary: str = "127.0.0.1") -> NextHop:
    """An MX pair on the sink's port: ``primary`` (preference 10), then ``secondary``."""
    return NextHop(key="mx:mx1.dest.test,mx2.dest.test",
                   hosts=(MailHost("mx1.dest.test", (primary,), 10),
                          MailHost("mx2.dest.test", (secondary,), 20)),
                   port=sink.port, tls="opportunistic", source="mx", expires_at=math.inf)


@pytest.mark.parametrize("peer", [
    BadPeer(greeting="421 4.3.2 mx1 busy, try later"),
    BadPeer(greeting="554 5.7.1 no SMTP service here"),
    BadPeer(greeting=None),
    BadPeer(replies={"EHLO": "502 5.5.1 EHLO refused", "HELO": "502 5.5.1 HELO refused"}),
], ids=["421-greeting", "554-greeting", "no-greeting", "ehlo-and-helo-refused"])
async def test_a_primary_failing_before_mail_is_skipped_for_the_next_mx(peer: BadPeer) -> None:
    timeouts = QUICK.model_copy(update={"greeting_timeout": 0.5})
    async with running_sink() as sink, running_bad_peer(peer, "127.0.0.2", sink.port):
        conn = OutboundConnection(two_hosts(sink), ehlo_name="relay.origin.test",
                                  timeouts=timeouts)
        (result,) = await conn.send(transaction("fallback@origin.test"), before_data=nothing)
        await conn.close()
        assert peer.sessions == 1, "the primary was tried first"
        assert result.code == 250, result
        assert conn.peer == f"mx2.dest.test[127.0.0.1]:{sink.port}"
        assert [t.message_id for t in sink.transactions] == ["fallback@origin.test"]


async def test_a_primary_whose_tls_handshake_fails_is_skipped_for_the_next_mx() -> None:
    peer = BadPeer(replies={"EHLO": "250-bad.peer.test\r\n250 STARTTLS",
                            "STARTTLS": "220 2.0.0 go ahead"})
    async with running_sink() as sink, running_bad_peer(peer, "127.0.0.2", sink.port):
        conn = OutboundConnection(two_hosts(sink), ehlo_name="relay.origin.test",
                                  timeouts=QUICK)
        (result,) = await conn.send(transaction("tlsfall@origin.test"), before_data=nothing)
        await conn.close()
        assert peer.sessions == 1
        assert result.code == 250, result
        assert len(sink.transactions) == 1


async def test_every_host_failing_before_mail_gives_each_hosts_evidence() -> None:
    primary = BadPeer(greeting="554 5.7.1 no SMTP service here")
    secondary = BadPeer(greeting="421 4.3.2 busy")
    async with running_sink() as sink, \
            running_bad_peer(primary, "127.0.0.2", sink.port), \
            running_bad_peer(secondary, "127.0.0.3", sink.port):
        conn = OutboundConnection(two_hosts(sink, "127.0.0.2", "127.0.0.3"),
                                  ehlo_name="relay.origin.test", timeouts=QUICK)
        (result,) = await conn.send(transaction("nohost@origin.test"), before_data=nothing)
        assert (result.code, result.phase, result.data_sent) == (421, "greeting", False)
        assert f"mx1.dest.test[127.0.0.2]:{sink.port}: 554 5.7.1 no SMTP service here" \
            in result.text
        assert f"mx2.dest.test[127.0.0.3]:{sink.port}: 421 4.3.2 busy" in result.text
        assert sink.transactions == []


async def test_no_more_than_two_sessions_fail_before_mail_per_attempt() -> None:
    peers = [BadPeer(greeting="421 4.3.2 busy") for _ in range(3)]
    async with running_sink() as sink, \
            running_bad_peer(peers[0], "127.0.0.2", sink.port), \
            running_bad_peer(peers[1], "127.0.0.3", sink.port), \
            running_bad_peer(peers[2], "127.0.0.4", sink.port):
        hop = NextHop(key="mx:many", hosts=tuple(
            MailHost(f"mx{n}.dest.test", (f"127.0.0.{n + 2}",), n) for n in range(3)),
            port=sink.port, tls="none", source="mx", expires_at=math.inf)
        conn = OutboundConnection(hop, ehlo_name="relay.origin.test", timeouts=QUICK)
        (result,) = await conn.send(transaction("limit@origin.test"), before_data=nothing)
        assert result.code == 421
        assert [peer.sessions for peer in peers] == [1, 1, 0]


async def test_refused_connections_to_every_host_are_all_reported() -> None:
    async with running_sink() as sink:
        port = sink.port
    hop_ = NextHop(key="mx:dead", hosts=(MailHost("a.test", ("127.0.0.1",), 10),
                                         MailHost("b.test", ("127.0.0.2",), 20)),
                   port=port, tls="none", source="mx", expires_at=math.inf)
    conn = OutboundConnection(hop_, ehlo_name="relay.origin.test", timeouts=QUICK)
    (result,) = await conn.send(transaction("dead@origin.test"), before_data=nothing)
    assert (result.code, result.phase) == (0, "connect")
    assert result.text.startswith("no host accepted a connection: ")
    assert f"a.test[127.0.0.1]:{port}" in result.text and f"b.test[127.0.0.2]:{port}" in \
        result.text


async def test_auth_refused_with_535_is_a_setup_failure(server_tls: ssl.SSLContext) -> None:
    async with running_sink(tls_context=server_tls, credentials={"relay": "s3cret"}) as sink:
        conn = OutboundConnection(hop(sink, "opportunistic", "relay", "wrong"),
                                  ehlo_name="relay.origin.test", timeouts=QUICK)
        (result,) = await conn.send(transaction("badauth@origin.test"), before_data=nothing)
        assert (result.code, result.phase, result.data_sent) == (535, "auth", False)
        assert result.phase in SETUP_PHASES
        assert sink.transactions == []


def _reads_with(sink: Sink, *needles: bytes) -> list[bytes]:
    assert sink.reads is not None
    return [chunk for chunk in sink.reads if all(needle in chunk for needle in needles)]


async def test_a_pipelined_transaction_is_one_group_and_reuse_starts_it_with_rset() -> None:
    """RFC 2920: MAIL, every RCPT and DATA go out together; on a reused session RSET
    heads the group, so checking the session costs no round trip."""
    async with running_sink(record_reads=True) as sink:
        conn = connection(sink)
        first = await conn.send(transaction("p1@origin.test", "a@dest.test", "b@dest.test",
                                            "c@dest.test"), before_data=nothing)
        second = await conn.send(transaction("p2@origin.test", "d@dest.test"),
                                 before_data=nothing)
        await conn.close()
    assert [r.code for r in first + second] == [250, 250, 250, 250]
    assert conn.pipelining and sink.connections == 1
    group = b"MAIL FROM:<sender@origin.test>\r\nRCPT TO:<a@dest.test>\r\n" \
        b"RCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\nDATA\r\n"
    assert any(chunk == group for chunk in sink.reads or []), sink.reads
    again = b"RSET\r\nMAIL FROM:<sender@origin.test>\r\nRCPT TO:<d@dest.test>\r\nDATA\r\n"
    assert any(chunk == again for chunk in sink.reads or []), sink.reads
    assert [t.recipients for t in sink.transactions] == [
        ("a@dest.test", "b@dest.test", "c@dest.test"), ("d@dest.test",)]


async def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    async with running_sink(record_reads=True, pipelining=False) as sink:
        conn = connection(sink)
        results = await conn.send(transaction("lock@origin.test", "a@dest.test",
                                              "b@dest.test"), before_data=nothing)
        results += await conn.send(transaction("lock2@origin.test"), before_data=nothing)
        await conn.close()
    assert [r.code for r in results] == [250, 250, 250]
    assert not conn.pipelining
    assert _reads_with(sink, b"MAIL FROM") and not _reads_with(sink, b"MAIL FROM", b"RCPT")
    assert _reads_with(sink, b"RSET") and not _reads_with(sink, b"RSET", b"MAIL")
    assert len(sink.transactions) == 2


def peer_hop(port: int) -> NextHop:
    """A static route to a scripted peer on 127.0.0.2."""
    return NextHop(key=f"route:127.0.0.2:{port}/none",
                   hosts=(MailHost("127.0.0.2", ("127.0.0.2",), 0),), port=port, tls="none",
                   source="route", expires_at=math.inf)


PIPELINING_EHLO = "250-bad.peer.test\r\n250 PIPELINING"


@pytest.mark.parametrize(("data_reply", "reusable"), [
    ("503 5.5.1 no valid recipients", True),
    ("354 go ahead", False),
], ids=["data-refused", "data-accepted-anyway"])
async def test_a_refused_sender_in_a_pipelined_group_fails_every_recipient_without_content(
    data_reply: str, reusable: bool,
) -> None:
    """Every reply of the group is read. A server that answers 354 to DATA after refusing
    MAIL gets the connection closed, never a dot that might deliver an empty message."""
    port = free_port()
    peer = BadPeer(replies={"EHLO": PIPELINING_EHLO, "MAIL": "550 5.7.1 sender refused",
                            "RCPT": "503 5.5.1 need MAIL first", "DATA": data_reply})
    async with running_bad_peer(peer, "127.0.0.2", port):
        conn = OutboundConnection(peer_hop(port), ehlo_name="relay.origin.test",
                                  timeouts=QUICK)
        results = await conn.send(transaction("refused@origin.test", "a@dest.test",
                                              "b@dest.test"), before_data=nothing)
        assert conn.reusable is reusable
        await conn.close()
    assert [(r.code, r.text, r.phase, r.data_sent) for r in results] == \
        [(550, "5.7.1 sender refused", "mail", False)] * 2
    assert b"." not in peer.lines


async def test_a_malformed_reply_retires_the_session_with_evidence() -> None:
    port = free_port()
    peer = BadPeer(replies={"EHLO": PIPELINING_EHLO, "MAIL": "hello there"})
    async with running_bad_peer(peer, "127.0.0.2", port):
        conn = OutboundConnection(peer_hop(port), ehlo_name="relay.origin.test",
                                  timeouts=QUICK)
        (result,) = await conn.send(transaction("garbled@origin.test"), before_data=nothing)
        await conn.close()
    assert (result.code, result.phase, result.data_sent) == (0, "mail", False)
    assert "malformed reply line: 'hello there'" in result.text
    assert not conn.reusable


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_reused_session_closed_by_the_server_is_replaced_without_a_deferral(
    pipelining: bool,
) -> None:
    """A server may drop an idle session at any time; the transaction that finds it
    closed, before anything of it was answered, runs on a fresh session instead."""
    prepared: list[str] = []

    async def before_data() -> None:
        prepared.append("journaled")

    async with running_sink(pipelining=pipelining) as sink:
        conn = connection(sink)
        (first,) = await conn.send(transaction("s1@origin.test"), before_data=nothing)
        sink.drop_connections()
        (second,) = await conn.send(transaction("s2@origin.test"), before_data=before_data)
        await conn.close()
    assert (first.code, second.code) == (250, 250), second
    assert sink.connections == 2 and prepared == ["journaled"]
    assert [t.message_id for t in sink.transactions] == ["s1@origin.test", "s2@origin.test"]
