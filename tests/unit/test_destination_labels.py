"""Issue 12's cap on the ``destination`` label: the busiest destinations since start get
labels, at most :data:`MAX_DESTINATIONS`, kept until restart; one-offs are ``other``."""

from __future__ import annotations

from mta.admin.metrics import (
    MAX_COUNTED_DESTINATIONS,
    MAX_DESTINATIONS,
    MIN_LABEL_ATTEMPTS,
    OTHER_DESTINATION,
    Metrics,
)


def attempt(metrics: Metrics, name: str, times: int) -> list[str]:
    return [metrics.attempted(name) for _ in range(times)]


def test_busy_destinations_get_labels_after_twenty_one_offs() -> None:
    metrics = Metrics("n1")
    small = [f"small{i}.example" for i in range(MAX_DESTINATIONS)]
    assert {metrics.attempted(name) for name in small} == {OTHER_DESTINATION}
    busy = [f"mx{i}.example" for i in range(MAX_DESTINATIONS)]
    for _ in range(10):
        for name in busy:
            metrics.attempted(name)
    assert [metrics.destination(name) for name in busy] == busy
    assert {metrics.destination(name) for name in small} == {OTHER_DESTINATION}


def test_a_destination_is_other_until_its_minimum_attempts() -> None:
    metrics = Metrics("n1")
    labels = attempt(metrics, "mx.example", MIN_LABEL_ATTEMPTS)
    assert labels == [OTHER_DESTINATION] * (MIN_LABEL_ATTEMPTS - 1) + ["mx.example"]


def test_destination_counts_nothing() -> None:
    metrics = Metrics("n1")
    for _ in range(10):
        assert metrics.destination("mx.example") == OTHER_DESTINATION
    assert attempt(metrics, "mx.example", MIN_LABEL_ATTEMPTS - 1) == [OTHER_DESTINATION] * (
        MIN_LABEL_ATTEMPTS - 1), "the destination() calls were not counted as attempts"
    assert metrics.attempted("mx.example") == "mx.example"
    assert metrics.destination("mx.example") == "mx.example"


def test_an_early_one_off_does_not_take_a_slot() -> None:
    metrics = Metrics("n1")
    assert metrics.attempted("once.example") == OTHER_DESTINATION
    busy = [f"mx{i}.example" for i in range(MAX_DESTINATIONS)]
    for name in busy:
        assert attempt(metrics, name, MIN_LABEL_ATTEMPTS)[-1] == name
    assert metrics.destination("once.example") == OTHER_DESTINATION
    assert attempt(metrics, "once.example", 10) == [OTHER_DESTINATION] * 10, "no slot is left"


def test_a_label_is_kept_after_others_overtake_it() -> None:
    metrics = Metrics("n1")
    assert attempt(metrics, "first.example", MIN_LABEL_ATTEMPTS) == [OTHER_DESTINATION] * (
        MIN_LABEL_ATTEMPTS - 1) + ["first.example"]
    later = [f"mx{i}.example" for i in range(3 * MAX_DESTINATIONS)]
    for _ in range(50):
        for name in later:
            metrics.attempted(name)
    assert metrics.destination("first.example") == "first.example"
    assert metrics.attempted("first.example") == "first.example"
    labelled = [name for name in later if metrics.destination(name) == name]
    assert labelled == later[:MAX_DESTINATIONS - 1], "the first to reach the minimum"


def test_never_more_than_the_cap_of_labels() -> None:
    metrics = Metrics("n1")
    given: set[str] = set()
    for round_ in range(2 * MIN_LABEL_ATTEMPTS):
        for i in range(500):
            given.add(metrics.attempted(f"d{i}.example"))
            given.add(metrics.attempted(f"once{round_}-{i}.example"))
    given.discard(OTHER_DESTINATION)
    assert given == {f"d{i}.example" for i in range(MAX_DESTINATIONS)}


def test_the_count_table_stays_bounded_under_a_flood_of_new_names() -> None:
    metrics = Metrics("n1")
    largest = 0
    for i in range(100_000):
        assert metrics.attempted(f"flood{i}.example") == OTHER_DESTINATION
        if i % 1000 == 0:  # a real destination, now and then among the flood
            metrics.attempted("mx.example")
        largest = max(largest, len(metrics._attempts))
    assert largest <= MAX_COUNTED_DESTINATIONS
    assert metrics.destination("mx.example") == "mx.example", "its count survived the flood"
