"""The query-load point's arithmetic (app/tools/bench.py ``phase_split``): scrapes split into
the phases with and without lookup API queries."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.tools.bench import phase_split


def scrapes(
    rates: list[tuple[float, float]], every: float = 0.25, until: float = 8.0
) -> list[tuple[float, float, float]]:
    """(time, messages done, CPU s) every ``every`` s; ``rates``: (msgs/s, CPU s per s) per 2 s phase."""
    samples, done, cpu, t = [], 0.0, 0.0, 0.0
    while t <= until + 1e-9:
        samples.append((t, done, cpu))
        rate, busy = rates[min(int(t // 2), len(rates) - 1)]
        done, cpu, t = done + rate * every, cpu + busy * every, t + every
    return samples


def test_each_phase_gets_its_own_rate_and_cpu() -> None:
    # queries on 0-2 s and 4-6 s: 900 msgs/s at 1.0 CPU; off 2-4 s and 6-8 s: 1000 msgs/s at 0.8 CPU
    samples = scrapes([(900, 1.0), (1000, 0.8), (900, 1.0), (1000, 0.8)])
    split = phase_split(samples, [0.1, 2.1, 4.1, 6.1, 8.1])
    assert split["msgs_per_s_with_queries"] == pytest.approx(900)
    assert split["msgs_per_s_without"] == pytest.approx(1000)
    assert split["cpu_us_per_msg_with_queries"] == pytest.approx(1e6 / 900)
    assert split["cpu_us_per_msg_without"] == pytest.approx(800)
    # an interval across a switch (1.75-2.0 s is in, 2.0-2.25 s straddles 2.1) counts for neither
    assert split["seconds_with_queries"] + split["seconds_without"] < 8.0


def test_scrapes_before_the_client_started_count_for_neither() -> None:
    samples = scrapes([(5000, 2.0), (1000, 0.8), (1000, 0.8), (1000, 0.8)])
    split = phase_split(samples, [2.0, 4.0, 6.0])  # started at 2 s; the fast start is not counted
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000)
    assert split["msgs_per_s_without"] == pytest.approx(1000)


def test_after_the_last_switch_counts_for_neither() -> None:
    """The run ends inside its last phase: the backlog's tail (a slow end) is not a phase."""
    samples = scrapes([(1000, 1.0), (1000, 1.0), (10, 0.1)], until=6.0)
    split = phase_split(samples, [0.0, 2.0, 4.0])
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000) and split["msgs_per_s_without"] == pytest.approx(
        1000
    )


def test_no_phase_without_queries_is_not_a_number() -> None:
    split = phase_split(scrapes([(1000, 1.0)], until=1.5), [0.0, 2.0])
    assert split["msgs_per_s_with_queries"] == pytest.approx(1000) and math.isnan(split["msgs_per_s_without"])


@given(
    rates=st.lists(st.tuples(st.floats(1, 1e5), st.floats(0.01, 2)), min_size=2, max_size=6),
    shift=st.floats(0, 1.99),
)
def test_the_totals_never_exceed_the_run(rates: list[tuple[float, float]], shift: float) -> None:
    samples = scrapes(rates, until=2.0 * len(rates))
    switches = [shift + 2.0 * n for n in range(len(rates) + 1)]
    split = phase_split(samples, switches)
    assert split["seconds_with_queries"] + split["seconds_without"] <= samples[-1][0] - samples[0][0] + 1e-9
    for key in ("msgs_per_s_with_queries", "msgs_per_s_without"):
        assert (
            math.isnan(split[key]) or min(r for r, _ in rates) - 1e-6 <= split[key] <= max(r for r, _ in rates) + 1e-6
        )
