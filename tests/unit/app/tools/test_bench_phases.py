"""The query-load point's arithmetic (app/tools/bench.py ``phase_split``): scrapes split into
the phases with and without lookup API queries."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.tools.bench import API_PHASE_S, phase_split, phase_switches


def scrapes(
    rates: list[tuple[float, float]], every: float = 0.25, until: float = 8.0, batch: int = 100
) -> list[tuple[float, float, float]]:
    """What the bench scrapes every ``every`` s from a worker that acks ``batch`` messages at a
    time: (time, messages acked, sum of the CPU between acks). ``rates``: (msgs/s, CPU s per s)
    per 2 s phase. The worker is simulated in steps of 1 ms."""
    samples, read, acked, cpu, cpu_at_ack, batch_cpu = [], 0.0, 0, 0.0, None, 0.0
    step, ticks = 0.001, round(until / 0.001)
    for tick in range(ticks + 1):
        t = tick * step
        if tick % round(every / step) == 0:
            samples.append((t, float(acked), batch_cpu))
        rate, busy = rates[min(int(t // 2), len(rates) - 1)]
        read, cpu = read + rate * step, cpu + busy * step
        while read - acked >= batch:
            acked += batch
            if cpu_at_ack is not None:  # the first ack has no batch before it to measure from
                batch_cpu += cpu - cpu_at_ack
            cpu_at_ack = cpu
    return samples


def test_each_phase_gets_its_own_rate_and_cpu() -> None:
    # queries on 0-2 s and 4-6 s: 900 msgs/s at 1.0 CPU; off 2-4 s and 6-8 s: 1000 msgs/s at 0.8 CPU
    samples = scrapes([(900, 1.0), (1000, 0.8), (900, 1.0), (1000, 0.8)])
    split = phase_split(samples, [0.1, 2.1, 4.1, 6.1, 8.1])
    assert split["msgs_per_s_with_queries"] == pytest.approx(900, rel=0.1)
    assert split["msgs_per_s_without"] == pytest.approx(1000, rel=0.1)
    # whole batches only: the CPU per message of each side exactly, though 2 s held 18 or 20 batches
    assert split["cpu_us_per_msg_with_queries"] == pytest.approx(1e6 / 900, rel=0.01)
    assert split["cpu_us_per_msg_without"] == pytest.approx(800, rel=0.01)
    # an interval across a switch (1.75-2.0 s is in, 2.0-2.25 s straddles 2.1) counts for neither
    assert split["seconds_with_queries"] + split["seconds_without"] < 8.0


def test_scrapes_before_the_client_started_count_for_neither() -> None:
    samples = scrapes([(5000, 2.0), (1000, 0.8), (1000, 0.8), (1000, 0.8)])
    split = phase_split(samples, [2.0, 4.0, 6.0])  # started at 2 s; the fast start is not counted
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000, rel=0.1)
    assert split["msgs_per_s_without"] == pytest.approx(1000, rel=0.1)
    assert split["cpu_us_per_msg_with_queries"] == pytest.approx(800, rel=0.01)


def test_after_the_last_switch_counts_for_neither() -> None:
    """The run ends inside its last phase: the backlog's tail (a slow end) is not a phase."""
    samples = scrapes([(1000, 1.0), (1000, 1.0), (10, 0.1)], until=6.0)
    split = phase_split(samples, [0.0, 2.0, 4.0])
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000, rel=0.1)
    assert split["msgs_per_s_without"] == pytest.approx(1000, rel=0.1)
    assert split["cpu_us_per_msg_without"] == pytest.approx(1000, rel=0.01)


def test_no_phase_without_queries_is_not_a_number() -> None:
    split = phase_split(scrapes([(1000, 1.0)], until=1.5), [0.0, 2.0])
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000, rel=0.1) and math.isnan(split["msgs_per_s_without"])


@given(
    rates=st.lists(st.tuples(st.floats(1, 1e5), st.floats(0.01, 2)), min_size=2, max_size=6),
    shift=st.floats(0, 1.99),
)
def test_the_totals_never_exceed_the_run(rates: list[tuple[float, float]], shift: float) -> None:
    samples = scrapes(rates, until=2.0 * len(rates))
    switches = [shift + 2.0 * n for n in range(len(rates) + 1)]
    split = phase_split(samples, switches)
    assert split["seconds_with_queries"] + split["seconds_without"] <= samples[-1][0] - samples[0][0] + 1e-9
    assert split["batched_messages_with_queries"] + split["batched_messages_without"] <= samples[-1][1]
    # a batch counted lies within one phase of queries, maybe across two of the worker's rates
    per_message = [busy / rate * 1e6 for rate, busy in rates]
    for key in ("cpu_us_per_msg_with_queries", "cpu_us_per_msg_without"):  # within 1 %: acks on 1 ms steps
        assert math.isnan(split[key]) or min(per_message) * 0.99 <= split[key] <= max(per_message) * 1.01


def test_a_batch_begun_before_its_phase_counts_for_neither() -> None:
    """A batch whose CPU began in the phase before (its previous ack came before the switch)
    holds the other phase's work: it is left out, and so is the first ack after a switch."""
    # 300-message batches, acked at 0.3 s, 0.6 s, ...: the first after 2.0 s (at 2.1) began at
    # 1.8 s, in the phase before. Queries on 0-2 s and 4-6 s (here the cheap ones), off between
    samples = scrapes([(1000, 0.5), (1000, 2.0), (1000, 0.5), (1000, 2.0)], batch=300)
    split = phase_split(samples, [0.0, 2.0, 4.0, 6.0, 8.0])
    assert split["cpu_us_per_msg_with_queries"] == pytest.approx(500, rel=0.01)
    assert split["cpu_us_per_msg_without"] == pytest.approx(2000, rel=0.01)


def test_cpu_per_message_does_not_depend_on_where_the_acks_fall() -> None:
    """Messages over the phase's seconds, CPU over its seconds: the quantised acks move the
    CPU per message by a batch's share. The batch count does not move."""
    rates = [(950, 1.0)] * 8
    samples = scrapes(rates, until=16.0, batch=500)
    switches = [0.3 + 1.9 * n for n in range(9)]
    split = phase_split(samples, switches)
    for side in ("with_queries", "without"):
        assert split[f"cpu_us_per_msg_{side}"] == pytest.approx(1e6 / 950, rel=0.01)
        assert split[f"batched_messages_{side}"] > 0


@given(seed=st.integers(0, 2**32 - 1))
def test_a_drift_over_the_run_falls_on_both_sides_alike(seed: int) -> None:
    """The worker's CPU per message grows through the run (here by half); the phase blocks
    (on, off, off, on) give both sides the same share of it."""
    switches = phase_switches(0.0, 40.0, random.Random(seed))
    until = switches[-1] + 0.5
    rates = [(2000, 0.5 + 0.25 * n / 20) for n in range(int(until // 2) + 1)]  # CPU 250 -> 375 µs/msg
    split = phase_split(scrapes(rates, until=until, batch=200), switches)
    assert split["cpu_us_per_msg_with_queries"] == pytest.approx(split["cpu_us_per_msg_without"], rel=0.02)


def test_phases_are_blocks_of_on_off_off_on() -> None:
    switches = phase_switches(10.0, 30.0, random.Random(1))
    lengths = [b - a for a, b in itertools.pairwise(switches)]
    assert switches[0] == 10.0 and switches[-1] >= 40.0
    assert lengths[1] == pytest.approx(2 * lengths[0])  # on q, off 2q
    # each block's halves: on for q1 + q2, off 2 q2, ...; all within half to 1.5 times API_PHASE_S / 2
    quarters = [length / 2 for length in lengths[1::2]]
    assert all(API_PHASE_S / 4 <= q <= API_PHASE_S * 3 / 4 for q in quarters)
    assert lengths[2] == pytest.approx(quarters[0] + quarters[1])
