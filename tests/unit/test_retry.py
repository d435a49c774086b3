"""Retry policy: backoff delays, classification of attempt results, status codes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.delivery.retry import Decision, RetryPolicy, classify, next_attempt_delay, status_for

NO_JITTER = RetryPolicy(jitter=0.0)
DEFAULT = RetryPolicy()


def test_defaults_are_postfix_values() -> None:
    assert (DEFAULT.minimal_backoff, DEFAULT.maximal_backoff) == (300.0, 4000.0)
    assert DEFAULT.max_lifetime == 5 * 86400.0
    assert DEFAULT.jitter == 0.2


def test_delays_double_then_cap_at_maximal_backoff() -> None:
    rng = random.Random(1)
    delays = [next_attempt_delay(NO_JITTER, n, rng) for n in range(1, 9)]
    assert delays == [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0, 4000.0, 4000.0]


def test_huge_attempt_counts_stay_at_the_cap() -> None:
    assert next_attempt_delay(NO_JITTER, 10_000, random.Random(1)) == 4000.0


def test_attempts_below_one_are_rejected() -> None:
    with pytest.raises(ValueError):
        next_attempt_delay(DEFAULT, 0, random.Random(1))


def test_jitter_stays_within_bounds_and_spreads_over_many_draws() -> None:
    rng = random.Random(42)
    factors = [next_attempt_delay(DEFAULT, 1, rng) / 300.0 for _ in range(5000)]
    assert all(0.8 <= f <= 1.2 for f in factors)
    assert min(factors) < 0.81
    assert max(factors) > 1.19
    assert 0.99 < sum(factors) / len(factors) < 1.01


def test_same_seed_gives_same_delays() -> None:
    first = [next_attempt_delay(DEFAULT, n, random.Random(7)) for n in range(1, 6)]
    second = [next_attempt_delay(DEFAULT, n, random.Random(7)) for n in range(1, 6)]
    assert first == second


@given(
    minimal=st.floats(1.0, 1000.0),
    ratio=st.floats(1.0, 100.0),
    jitter=st.floats(0.0, 0.99),
    attempts=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_delay_always_within_jittered_bounds(
    minimal: float, ratio: float, jitter: float, attempts: int, seed: int
) -> None:
    policy = RetryPolicy(minimal_backoff=minimal, maximal_backoff=minimal * ratio, jitter=jitter)
    delay = next_attempt_delay(policy, attempts, random.Random(seed))
    base = min(policy.maximal_backoff, minimal * 2.0 ** (attempts - 1))
    assert minimal * (1 - jitter) * (1 - 1e-9) <= delay
    assert delay <= policy.maximal_backoff * (1 + jitter) * (1 + 1e-9)
    assert base * (1 - jitter) * (1 - 1e-9) <= delay <= base * (1 + jitter) * (1 + 1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"minimal_backoff": 0.0},
        {"minimal_backoff": 500.0, "maximal_backoff": 400.0},
        {"max_lifetime": 0.0},
        {"jitter": -0.1},
        {"jitter": 1.0},
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_2xx_is_delivered() -> None:
    assert classify(250, True, age=0.0, policy=DEFAULT) == Decision("delivered", False, "250 reply")


def test_5xx_fails_even_when_young() -> None:
    assert classify(550, True, age=0.0, policy=DEFAULT) == Decision("failed", False, "550 reply")


def test_4xx_defers() -> None:
    decision = classify(451, True, age=3600.0, policy=DEFAULT)
    assert decision == Decision("deferred", False, "451 reply")


def test_4xx_past_max_lifetime_fails_as_expired() -> None:
    decision = classify(421, False, age=DEFAULT.max_lifetime, policy=DEFAULT)
    assert decision == Decision("failed", False, "expired")


def test_network_error_before_data_defers() -> None:
    decision = classify(0, False, age=10.0, policy=DEFAULT)
    assert decision.outcome == "deferred"
    assert not decision.possible_duplicate


def test_network_error_before_data_past_lifetime_expires() -> None:
    decision = classify(0, False, age=DEFAULT.max_lifetime + 1, policy=DEFAULT)
    assert decision == Decision("failed", False, "expired")


def test_no_reply_after_data_is_uncertain_by_default() -> None:
    decision = classify(0, True, age=10.0, policy=DEFAULT)
    assert decision.outcome == "uncertain"
    assert not decision.possible_duplicate


def test_uncertain_is_not_expired_by_age() -> None:
    decision = classify(0, True, age=DEFAULT.max_lifetime * 2, policy=DEFAULT)
    assert decision.outcome == "uncertain"


def test_retry_mode_defers_with_possible_duplicate() -> None:
    decision = classify(0, True, age=10.0, policy=DEFAULT, uncertain_mode="retry")
    assert decision.outcome == "deferred"
    assert decision.possible_duplicate


def test_retry_mode_expiry_keeps_possible_duplicate_mark() -> None:
    decision = classify(0, True, age=DEFAULT.max_lifetime, policy=DEFAULT, uncertain_mode="retry")
    assert decision == Decision("failed", True, "expired")


def test_retry_mode_does_not_change_definite_replies() -> None:
    for code, outcome in [(250, "delivered"), (451, "deferred"), (554, "failed")]:
        decision = classify(code, True, age=0.0, policy=DEFAULT, uncertain_mode="retry")
        assert (decision.outcome, decision.possible_duplicate) == (outcome, False)


def test_unexpected_reply_code_counts_as_no_reply() -> None:
    assert classify(354, True, age=0.0, policy=DEFAULT).outcome == "uncertain"
    assert classify(354, False, age=0.0, policy=DEFAULT).outcome == "deferred"


@pytest.mark.parametrize("code", [-1, 7, 99, 600])
def test_impossible_codes_are_rejected(code: int) -> None:
    with pytest.raises(ValueError):
        classify(code, False, age=0.0, policy=DEFAULT)


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (550, "550 5.1.1 no such user", "5.1.1"),
        (550, "5.1.1 no such user", "5.1.1"),
        (452, "452-4.2.2 mailbox full", "4.2.2"),
        (250, "250 2.6.0 queued as 123", "2.6.0"),
        (554, "554 5.7.120 blocked", "5.7.120"),
        (550, "550 no such user", "5.0.0"),
        (421, "421 try later", "4.0.0"),
        (250, "250 ok", "2.0.0"),
        (0, "", "4.0.0"),
        (550, "550 4.1.1 class disagrees", "5.0.0"),
        (550, "550 5.01.1 leading zero", "5.0.0"),
        (550, "550 5.1.1000 too long", "5.0.0"),
        (550, "550 5.1.1x not a code", "5.0.0"),
        (550, "550 user 5.1.1 not at start", "5.0.0"),
    ],
)
def test_status_for(code: int, text: str, status: str) -> None:
    assert status_for(code, text) == status


@pytest.mark.parametrize("code", [421, 554, 535])
def test_a_refusal_before_mail_defers_until_expiry(code: int) -> None:
    young = classify(code, False, age=0.0, policy=DEFAULT, before_mail=True)
    assert young.outcome == "deferred"
    old = classify(code, False, age=DEFAULT.max_lifetime, policy=DEFAULT, before_mail=True)
    assert (old.outcome, old.reason) == ("failed", "expired")
