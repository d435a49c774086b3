"""The tests' port allocator: a port chosen for a listener is never taken by anything else
before the listener binds it (a CI run failed on "Address already in use")."""

from __future__ import annotations

from tests.support.nodes import EPHEMERAL_RANGE, free_port, free_port_run


def test_ports_are_never_handed_out_twice_even_after_their_probe_is_closed() -> None:
    ports = [free_port() for _ in range(200)]
    run = free_port_run(3)
    later = [free_port() for _ in range(50)]
    handed = [*ports, run, run + 1, run + 2, *later]
    assert len(set(handed)) == len(handed)


def test_ports_lie_outside_the_range_outgoing_connections_take_source_ports_from() -> None:
    low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    ports = [free_port() for _ in range(100)]
    assert all(not low <= port <= high for port in ports), (low, high, ports)
