"""Which GPU workers each CPU worker sends its batches to: a pure, process-free dispatch schedule.

NOTE [ streamproc dispatch schedule ]

Write P = ``producers`` (CPU workers), C = ``consumers`` (GPU workers), g = gcd(P, C), and
``cycle_p = get_dispatch_schedule(p, P, C)``. Producer ``p`` sends its i-th batch to
``cycle_p[i % len(cycle_p)]``, so it sends the fraction

    w(p, c) = cycle_p.count(c) / len(cycle_p)                        of its batches to c.

Construction ("two rulers"): lay the producers side by side on [0, P*C), producer p owning
[p*C, (p+1)*C), and the consumers on the same segment, consumer c owning [c*P, (c+1)*P).
Producer p sends to c the share of its own interval that c's interval covers:

    n(p, c) = |[p*C, (p+1)*C) ∩ [c*P, (c+1)*P)|,    w(p, c) = n(p, c) / C.

``cycle_p`` lists each c exactly n(p, c) / k times (k = gcd of p's non-zero n(p, c)),
interleaved so that the batches to one consumer are spread out over the cycle. Guarantees,
exact (integer arithmetic, no rounding) and checked for every P, C in 1..16 by
``tests/test_dispatch_schedule.py``; 1-5 are also proven here:

1. Even load:   Σ_p w(p, c) = P / C                                   for every consumer c.
2. Fan-in:      d(c) = |{p : w(p, c) > 0}| ∈ {⌈P/C⌉, ⌈P/C⌉ + 1},
                Σ_c d(c) = P + C - g,    max_c d(c) = ⌈(P + C - g) / C⌉.
   Both the sum and the maximum are the least possible for any schedule meeting (1):
   in the bipartite graph of pairs with w(p, c) > 0, a connected component with producer
   set S and consumer set T carries |S| = |T|·P/C units of load, so |S| is a multiple of
   P/g and there are at most g components; a graph on P + C vertices with at most g
   components has at least P + C - g edges, and max_c d(c) ≥ (Σ_c d(c)) / C. The two-rulers
   layout has exactly g components (it splits into g identical blocks of P' = P/g producers
   and C' = C/g consumers), hence meets the first bound. For the second, write
   P' = q·C' + r (0 <= r < C'): consumer c's interval, of length P'/C' and starting at the
   fractional offset x = frac(c·P'/C') <= 1 - 1/C', touches q + ⌈x + r/C'⌉ producers, i.e.
   q when r = 0, q + 1 when r = 1, at most q + 2 otherwise: ⌈(P' + C' - 1) / C'⌉ each time.
   Examples: P >= C and C divides P: every consumer hears from exactly P/C producers;
   P <= C and P divides C: from exactly one.
3. Fan-out:     |set(cycle_p)| ≤ ⌈(P + C - g) / P⌉ (so ≤ 2 when P >= C), the least possible
   by the same argument with the roles swapped.
4. Short cycles: len(cycle_p) = C / k ≤ C, the shortest cycle that gives those exact shares.
5. Locality:    the producers of one consumer are consecutive indices, as are the distinct
   consumers in one cycle.
6. Smoothness:  after the first t batches of a cycle, | cycle_p[:t].count(c) - t·w(p, c) | < 1
   for every t and c (checked for P, C ≤ 64, not proven in general).

The schedule is static on purpose: it fixes *which* GPU workers a CPU worker may use, so each
GPU worker serves few CPU workers (few queues to wait on, bounded in-flight batches per pair).
Run-time balance (a slow batch, a skewed task) is the executor's backpressure job, not this one.
"""

from __future__ import annotations

import math
import operator

__all__ = ["get_dispatch_schedule"]


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    return value


def get_dispatch_schedule(producer: int, producers: int, consumers: int) -> list[int]:
    """The cycle of consumer indices that ``producer`` sends its batches to, in order.

    Runs in the main process (when the topology is built) and is pure: the same arguments
    always give the same list. Producer ``producer`` sends its i-th batch to
    ``schedule[i % len(schedule)]``; a consumer listed twice gets twice the share. Over all
    producers every consumer gets exactly ``producers / consumers`` producers' worth of
    batches, and each consumer hears from as few distinct producers as that allows. See
    NOTE [ streamproc dispatch schedule ] in this module for the invariants and their proof.

    >>> [get_dispatch_schedule(p, 4, 2) for p in range(4)]
    [[0], [0], [1], [1]]
    >>> [get_dispatch_schedule(p, 2, 4) for p in range(2)]
    [[0, 1], [2, 3]]
    >>> [get_dispatch_schedule(p, 3, 2) for p in range(3)]
    [[0], [0, 1], [1]]

    When the shares cannot be equal, a consumer is repeated: with 5 producers and 3
    consumers, producer 1 sends 2/3 of its batches to consumer 0 and 1/3 to consumer 1,
    interleaved rather than in runs:

    >>> [get_dispatch_schedule(p, 5, 3) for p in range(5)]
    [[0], [0, 1, 0], [1], [2, 1, 2], [2]]

    One producer feeds every consumer in turn; one consumer is fed by every producer:

    >>> get_dispatch_schedule(0, 1, 3), get_dispatch_schedule(2, 3, 1)
    ([0, 1, 2], [0])

    Args:
        producer: Index of the producer (CPU worker), ``0 <= producer < producers``.
        producers: Number of producers, at least 1.
        consumers: Number of consumers (GPU workers), at least 1.

    Returns:
        The consumer indices, each in ``range(consumers)``, at most ``consumers`` long.

    Raises:
        TypeError: An argument is not an int (``bool`` is refused too).
        ValueError: ``producers`` or ``consumers`` is below 1, or ``producer`` is outside
            ``range(producers)``.
    """
    producer = _check_count("producer", producer)
    producers = _check_count("producers", producers)
    consumers = _check_count("consumers", consumers)
    if producers < 1:
        raise ValueError(f"producers must be >= 1, got {producers}")
    if consumers < 1:
        raise ValueError(f"consumers must be >= 1, got {consumers}")
    if not 0 <= producer < producers:
        raise ValueError(f"producer must be in range({producers}), got {producer}")

    # Both rulers in integer units of 1/(P*C) of the total load: producer p owns
    # [start, stop) below; consumer c owns [c*P, (c+1)*P).
    start, stop = producer * consumers, (producer + 1) * consumers
    first, last = start // producers, (stop - 1) // producers
    shares = {c: min(stop, (c + 1) * producers) - max(start, c * producers) for c in range(first, last + 1)}
    # Every listed consumer overlaps the producer's interval, so every share is > 0, and
    # Σ shares = C; dividing by their gcd k gives the shortest cycle, of length C / k.
    k = math.gcd(*shares.values())
    counts = {c: n // k for c, n in shares.items()}
    # Interleave: the j-th copy of c (0-based) sits at phase (j + 1/2) / counts[c] of the
    # cycle (Sainte-Laguë / Webster order), ties broken by consumer index, so consecutive
    # batches to one consumer are about len / counts[c] apart instead of bunched together.
    from fractions import Fraction  # here: fractions imports decimal, 0.3 MB in every forked worker (issue 10)

    slots = sorted((Fraction(2 * j + 1, 2 * n), c) for c, n in counts.items() for j in range(n))
    return [c for _, c in slots]
