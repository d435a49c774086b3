"""The destination label is capped, and kept once given (issue 12)."""

from __future__ import annotations

from mta.admin.metrics import MAX_DESTINATIONS, Metrics
from mta.delivery.attempt import defer_reason
from mta.delivery.outbound.transaction import RecipientResult


def test_destinations_past_the_cap_are_other_and_labels_stick() -> None:
    metrics = Metrics("n1")
    first = [f"mx{i}.example" for i in range(MAX_DESTINATIONS)]
    assert [metrics.destination(name) for name in first] == first
    assert metrics.destination("late.example") == "other"
    assert metrics.destination(first[0]) == first[0], "a label once given is kept"
    assert metrics.destination("late.example") == "other"


def test_deferrals_are_labelled_by_a_bounded_reason() -> None:
    def result(code: int, text: str = "x", source: str = "smtp") -> RecipientResult:
        return RecipientResult("a@b", code, text, "rcpt", False, source)  # type: ignore[arg-type]

    assert defer_reason(result(451)) == "reply_4xx"
    assert defer_reason(result(0)) == "no_reply"
    assert defer_reason(result(0, source="dns_temporary")) == "dns"
    assert defer_reason(result(0, "delivery temporarily suspended: x", "local")) == "suspended"
    assert defer_reason(result(0, "store gone", "local")) == "other"
