"""The delivery-test sink against a real SMTP client (aiosmtplib): records and faults."""

from __future__ import annotations

import asyncio
import random
import ssl

import aiosmtplib
import pytest
import trustme

from tests.support.sink import ACCEPTED, Faults, Sink, running_sink

SENDER = "sender@origin.test"


def message(message_id: str, size: int = 200) -> bytes:
    """A CRLF message with ``message_id`` and a body of about ``size`` bytes."""
    body = b"".join(b"line %04d of the body\r\n" % i for i in range(size // 22 + 1))
    return (f"From: {SENDER}\r\nMessage-ID: <{message_id}>\r\nSubject: test\r\n\r\n"
            .encode() + body)


def client(sink: Sink, timeout: float = 5.0, **kwargs: object) -> aiosmtplib.SMTP:
    """An aiosmtplib client for the sink, plain unless told otherwise."""
    kwargs.setdefault("start_tls", False)
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=timeout,
                           **kwargs)  # type: ignore[arg-type]


async def send(sink: Sink, message_id: str, recipients: list[str]) -> None:
    """One transaction on a fresh connection that must be accepted."""
    async with client(sink) as smtp:
        errors, reply = await smtp.sendmail(SENDER, recipients, message(message_id))
    assert errors == {}
    assert reply == ACCEPTED.split(" ", 1)[1]


async def test_sink_records_transactions_and_counts_duplicates() -> None:
    async with running_sink() as sink:
        await send(sink, "a@origin.test", ["one@dest.test", "two@dest.test"])
        await send(sink, "a@origin.test", ["One@dest.test"])
        await send(sink, "b@origin.test", ["one@dest.test"])
        await sink.wait_for_count(4, timeout=5)

        assert sink.count("<a@origin.test>", "one@dest.test") == 2
        assert sink.count("a@origin.test", "two@dest.test") == 1
        assert sink.duplicates() == {("a@origin.test", "one@dest.test"): 2}
        assert sink.received_ids() == {"a@origin.test", "b@origin.test"}
        expected = {("a@origin.test", "three@dest.test"), ("b@origin.test", "one@dest.test")}
        assert sink.missing(expected) == {("a@origin.test", "three@dest.test")}
        first, second, third = sink.transactions
        assert first.mail_from == SENDER
        assert first.recipients == ("one@dest.test", "two@dest.test")
        assert first.data == message("a@origin.test")
        assert first.received_at <= second.received_at <= third.received_at
        assert (first.reply, first.tls, first.auth_user) == (ACCEPTED, False, None)


async def test_wait_for_count_times_out_when_deliveries_are_missing() -> None:
    async with running_sink() as sink:
        await send(sink, "only@origin.test", ["one@dest.test"])
        with pytest.raises(TimeoutError):
            await sink.wait_for_count(2, timeout=0.2)


async def test_tempfail_fraction_is_exact_for_a_fixed_seed() -> None:
    seed, fraction, total = 7, 0.3, 40
    draws = random.Random(seed)
    expected = sum(draws.random() < fraction for _ in range(total))
    assert 0 < expected < total
    async with running_sink(seed=seed, faults=Faults(tempfail=fraction)) as sink:
        refused = 0
        async with client(sink) as smtp:
            for i in range(total):
                try:
                    await smtp.sendmail(SENDER, ["r@dest.test"], message(f"m{i}@origin.test"))
                except aiosmtplib.SMTPDataError as error:
                    assert error.code == 451
                    refused += 1
        assert refused == expected
        assert sink.deliveries() == total - expected
        assert sum(t.reply == Faults().tempfail_reply for t in sink.transactions) == expected


async def test_421_at_data_end_closes_the_connection() -> None:
    faults = Faults(tempfail=1.0, tempfail_reply="421 4.3.2 Sink: going away")
    async with running_sink(faults=faults) as sink:
        smtp = client(sink)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPResponseException) as raised:
            await smtp.sendmail(SENDER, ["r@dest.test"], message("x@origin.test"))
        assert raised.value.code == 421
        assert not smtp.is_connected
        assert sink.deliveries() == 0


async def test_rcpt_rejection_refuses_only_the_listed_recipients() -> None:
    faults = Faults(reject={"NOBODY@dest.test": "550 5.1.1 no such user"})
    async with running_sink(faults=faults) as sink, client(sink) as smtp:
        errors, _ = await smtp.sendmail(SENDER, ["ok@dest.test", "Nobody@dest.test"],
                                        message("r@origin.test"))
        assert errors["Nobody@dest.test"].code == 550
        assert errors["Nobody@dest.test"].message == "5.1.1 no such user"
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail(SENDER, ["nobody@dest.test"], message("s@origin.test"))
        assert sink.count("r@origin.test", "ok@dest.test") == 1
        assert sink.count("r@origin.test", "nobody@dest.test") == 0
        assert sink.received_ids() == {"r@origin.test"}


async def test_drop_mid_data_records_nothing_and_faults_change_during_a_test() -> None:
    async with running_sink(faults=Faults(drop_mid_data=1.0, drop_after_bytes=100)) as sink:
        smtp = client(sink)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(SENDER, ["r@dest.test"], message("cut@origin.test", 20_000))
        assert sink.transactions == []

        sink.faults = Faults()
        await send(sink, "whole@origin.test", ["r@dest.test"])
        assert sink.received_ids() == {"whole@origin.test"}


async def test_drop_after_dot_records_the_message_without_replying() -> None:
    async with running_sink(faults=Faults(drop_after_dot=1.0)) as sink:
        smtp = client(sink)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(SENDER, ["r@dest.test"], message("dot@origin.test"))
        (record,) = sink.transactions
        assert record.dropped_after_dot
        assert record.reply is None
        assert sink.count("dot@origin.test", "r@dest.test") == 1


async def test_hang_times_the_client_out_until_released() -> None:
    async with running_sink(faults=Faults(hang=True)) as sink:
        impatient = client(sink, timeout=0.3)
        await impatient.connect()
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await impatient.sendmail(SENDER, ["r@dest.test"], message("h1@origin.test"))
        impatient.close()

        patient = client(sink, timeout=10)
        await patient.connect()
        sending = asyncio.create_task(
            patient.sendmail(SENDER, ["r@dest.test"], message("h2@origin.test")))
        await sink.wait_until(lambda s: sum(t.hung for t in s.transactions) == 2, timeout=5)
        assert not sending.done()
        sink.release()
        _, reply = await asyncio.wait_for(sending, 5)
        patient.close()

        assert reply == ACCEPTED.split(" ", 1)[1]
        first, second = sink.transactions
        assert (first.hung, first.reply) == (True, None)
        assert (second.hung, second.reply) == (True, ACCEPTED)
        await send(sink, "h3@origin.test", ["r@dest.test"])
        assert not sink.transactions[-1].hung


async def test_hang_limit_bounds_an_unreleased_hang() -> None:
    async with running_sink(faults=Faults(hang=True), hang_limit=0.2) as sink:
        smtp = client(sink)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPResponseException) as raised:
            await smtp.sendmail(SENDER, ["r@dest.test"], message("limit@origin.test"))
        assert raised.value.code == 421
        assert sink.deliveries() == 0


async def test_no_greeting_mode_accepts_tcp_and_stays_silent() -> None:
    async with running_sink(faults=Faults(greet=False)) as sink:
        smtp = client(sink, timeout=0.3)
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await smtp.connect()
        assert sink.connections == 1
        smtp.close()


@pytest.fixture
def tls_pair(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a cert for 127.0.0.1, client context trusting the CA)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return server, trusting


async def test_starttls_with_a_trustme_certificate(
        tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_pair
    async with running_sink(tls_context=server_context) as sink:
        async with client(sink, start_tls=True, tls_context=client_context) as smtp:
            await smtp.sendmail(SENDER, ["r@dest.test"], message("tls@origin.test"))
        (record,) = sink.transactions
        assert record.tls


async def test_auth_is_required_when_credentials_are_set(
        tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_pair
    async with running_sink(tls_context=server_context, credentials={"relay": "s3cret"}) as sink:
        async with client(sink, start_tls=True, tls_context=client_context) as smtp:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as raised:
                await smtp.sendmail(SENDER, ["r@dest.test"], message("anon@origin.test"))
            assert raised.value.code == 530
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.login("relay", "wrong")
        async with client(sink, start_tls=True, tls_context=client_context,
                          username="relay", password="s3cret") as smtp:
            await smtp.sendmail(SENDER, ["r@dest.test"], message("auth@origin.test"))
        (record,) = sink.transactions
        assert (record.auth_user, record.message_id) == ("relay", "auth@origin.test")


def test_faults_refuse_fractions_over_one() -> None:
    with pytest.raises(ValueError):
        Faults(tempfail=0.6, drop_after_dot=0.5)
    with pytest.raises(ValueError):
        Faults(tempfail_reply="550 5.0.0 not a temporary failure")
