"""get_dispatch_schedule: a pure function, tested without processes (edsnlp/Ray style).

Shares are computed with exact fractions: producer p sends ``cycle.count(c) / len(cycle)`` of
its batches to consumer c. The bounds checked here are derived in NOTE [ streamproc dispatch
schedule ] (streamproc/backends/multiprocessing/schedule.py), where they are also shown to be
the best any exactly balanced schedule can do.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamproc as sp
from streamproc.execution.schedule import get_dispatch_schedule

counts = st.integers(min_value=1, max_value=16)
ALL_PAIRS = [(p, c) for p in range(1, 17) for c in range(1, 17)]


def schedules(producers: int, consumers: int) -> list[list[int]]:
    return [get_dispatch_schedule(p, producers, consumers) for p in range(producers)]


def shares(producers: int, consumers: int) -> dict[tuple[int, int], Fraction]:
    """{(producer, consumer): fraction of the producer's batches sent to the consumer}, non-zero only."""
    out: dict[tuple[int, int], Fraction] = {}
    for p, cycle in enumerate(schedules(producers, consumers)):
        for c in set(cycle):
            out[p, c] = Fraction(cycle.count(c), len(cycle))
    return out


def fan_in(producers: int, consumers: int) -> list[int]:
    """d(c): how many distinct producers send to consumer c."""
    pairs = shares(producers, consumers)
    return [sum(1 for (_, c) in pairs if c == consumer) for consumer in range(consumers)]


# --- table tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("producers", "consumers", "expected"),
    [
        (1, 1, [[0]]),
        (4, 1, [[0], [0], [0], [0]]),
        (1, 3, [[0, 1, 2]]),
        (4, 2, [[0], [0], [1], [1]]),
        (2, 4, [[0, 1], [2, 3]]),
        (3, 2, [[0], [0, 1], [1]]),
        (2, 3, [[0, 1, 0], [2, 1, 2]]),
        (5, 3, [[0], [0, 1, 0], [1], [2, 1, 2], [2]]),
        (6, 4, [[0], [0, 1], [1], [2], [2, 3], [3]]),
        (4, 6, [[0, 1, 0], [2, 1, 2], [3, 4, 3], [5, 4, 5]]),
        (3, 5, [[0, 1, 0, 1, 0], [2, 1, 2, 3, 2], [4, 3, 4, 3, 4]]),
        (7, 3, [[0], [0], [1, 0, 1], [1], [1, 2, 1], [2], [2]]),
        (3, 3, [[0], [1], [2]]),
    ],
)
def test_small_cases(producers: int, consumers: int, expected: list[list[int]]) -> None:
    assert schedules(producers, consumers) == expected


def test_exported_from_package() -> None:
    assert sp.get_dispatch_schedule is get_dispatch_schedule
    assert "get_dispatch_schedule" in sp.__all__


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 1), "producers must be >= 1"),
        ((0, 1, 0), "consumers must be >= 1"),
        ((0, -1, 2), "producers must be >= 1"),
        ((2, 2, 1), r"producer must be in range\(2\)"),
        ((-1, 2, 1), r"producer must be in range\(2\)"),
    ],
)
def test_out_of_range_arguments_raise_value_error(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_dispatch_schedule(*args)


@pytest.mark.parametrize("args", [(0.0, 1, 1), (0, "2", 1), (0, 1, True), (None, 1, 1)])
def test_non_int_arguments_raise_type_error(args: tuple) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        get_dispatch_schedule(*args)


# --- properties over every (producers, consumers) in 1..16 ------------------------------------


@given(counts, counts)
def test_cycles_are_valid_and_short(producers: int, consumers: int) -> None:
    for cycle in schedules(producers, consumers):
        assert 1 <= len(cycle) <= consumers
        assert all(isinstance(c, int) and 0 <= c < consumers for c in cycle)


@given(counts, counts)
def test_cycles_are_the_shortest_for_their_shares(producers: int, consumers: int) -> None:
    """No shorter cycle gives the same fractions: the per-consumer counts are coprime."""
    for cycle in schedules(producers, consumers):
        assert math.gcd(*(cycle.count(c) for c in set(cycle))) == 1


@given(counts, counts)
def test_every_consumer_receives_exactly_the_same_load(producers: int, consumers: int) -> None:
    """Σ_p w(p, c) = P / C exactly, for every consumer c."""
    load = dict.fromkeys(range(consumers), Fraction(0))
    for (_, c), share in shares(producers, consumers).items():
        load[c] += share
    assert all(total == Fraction(producers, consumers) for total in load.values())
    assert all(total > 0 for total in load.values())


@given(counts, counts)
def test_each_producer_sends_everything(producers: int, consumers: int) -> None:
    """Σ_c w(p, c) = 1: no producer is left idle or over-committed."""
    totals = dict.fromkeys(range(producers), Fraction(0))
    for (p, _), share in shares(producers, consumers).items():
        totals[p] += share
    assert set(totals.values()) == {1}


@given(counts, counts)
def test_fan_in_is_minimal(producers: int, consumers: int) -> None:
    """d(c) ∈ {⌈P/C⌉, ⌈P/C⌉+1}; Σ d(c) = P + C - g and max d(c) = ⌈(P + C - g)/C⌉ (the lower bounds)."""
    g = math.gcd(producers, consumers)
    degrees = fan_in(producers, consumers)
    lowest = -(-producers // consumers)
    assert set(degrees) <= {lowest, lowest + 1}
    assert sum(degrees) == producers + consumers - g
    assert max(degrees) == -(-(producers + consumers - g) // consumers)
    if producers % consumers == 0:
        assert set(degrees) == {producers // consumers}
    if consumers % producers == 0:
        assert set(degrees) == {1}


@given(counts, counts)
def test_fan_out_is_minimal(producers: int, consumers: int) -> None:
    """|set(cycle_p)| ≤ ⌈(P + C - g)/P⌉, reached by some producer; ≤ 2 when P >= C."""
    g = math.gcd(producers, consumers)
    fan_out = [len(set(cycle)) for cycle in schedules(producers, consumers)]
    assert max(fan_out) == -(-(producers + consumers - g) // producers)
    if producers >= consumers:
        assert max(fan_out) <= 2


@given(counts, counts)
def test_graph_has_gcd_components(producers: int, consumers: int) -> None:
    """The (producer, consumer) graph splits into exactly g = gcd(P, C) parts, the most any exact
    split allows; this is what makes Σ d(c) = P + C - g the least possible (see the NOTE)."""
    parent = list(range(producers + consumers))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p, c in shares(producers, consumers):
        parent[find(p)] = find(producers + c)
    components = {find(x) for x in range(producers + consumers)}
    assert len(components) == math.gcd(producers, consumers)


@given(counts, counts)
def test_producers_of_a_consumer_and_consumers_of_a_producer_are_contiguous(producers: int, consumers: int) -> None:
    pairs = shares(producers, consumers)
    for c in range(consumers):
        ps = sorted(p for (p, cc) in pairs if cc == c)
        assert ps == list(range(ps[0], ps[-1] + 1))
    for cycle in schedules(producers, consumers):
        cs = sorted(set(cycle))
        assert cs == list(range(cs[0], cs[-1] + 1))


@given(counts, counts)
def test_every_prefix_of_a_cycle_is_within_one_batch_of_the_exact_shares(producers: int, consumers: int) -> None:
    """Interleaving: after t batches of a cycle of length L, consumer c has received
    cycle[:t].count(c) batches, which differs from t * w(p, c) by less than one batch."""
    for cycle in schedules(producers, consumers):
        n = len(cycle)
        for c in set(cycle):
            share = Fraction(cycle.count(c), n)
            assert all(abs(cycle[:t].count(c) - t * share) < 1 for t in range(1, n + 1))


@given(counts, counts)
def test_deterministic(producers: int, consumers: int) -> None:
    assert schedules(producers, consumers) == schedules(producers, consumers)


def test_all_pairs_exhaustively() -> None:
    """Hypothesis samples; this checks the headline guarantee on all 256 pairs, every run."""
    for producers, consumers in ALL_PAIRS:
        load = dict.fromkeys(range(consumers), Fraction(0))
        for (_, c), share in shares(producers, consumers).items():
            load[c] += share
        assert set(load.values()) == {Fraction(producers, consumers)}, (producers, consumers)
        g = math.gcd(producers, consumers)
        assert max(fan_in(producers, consumers)) == -(-(producers + consumers - g) // consumers), (producers, consumers)
