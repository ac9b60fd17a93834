"""Threshold rules on closed windows: hysteresis, runs of windows, filters, validation, and the
same alerts whatever order readings within the grace period arrive in."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.alerts import CLEARED, RAISED, AlertPolicy, RulesError, load_rules, parse_rule
from agents.windows import ApplyResult, DeviceState, WindowPolicy
from models.records import Reading

SIZES = [60, 3600]
T0 = 1_796_270_400_000  # a minute boundary
GRACE_S = 60.0


def rule(**values: Any) -> Any:
    return parse_rule("rule 1", {"name": "hot", "metric": "t", **values}, SIZES)


def run(readings: list[tuple[int, float]], rules: list[Any], device: str = "press-1") -> list[tuple[str, int]]:
    """Apply (event ms, value) readings one message each; the alerts as (kind, window start)."""
    windows, policy, state = WindowPolicy(SIZES, GRACE_S, 3, 300), AlertPolicy(rules, GRACE_S), DeviceState()
    out = []
    for offset, (at, value) in enumerate(readings):
        windows.apply(state, [Reading(device, at, {"t": value}, 0, "f1", "l1")], offset, ApplyResult())
        state.labels = ["f1", "l1"]
        out += [(a[4], a[7]) for a in policy.evaluate(device, state, offset)]
    return out


def minutes(values: list[float]) -> list[tuple[int, float]]:
    """One reading in the middle of each minute, then one far later so every window closes."""
    series = [(T0 + n * 60_000 + 30_000, v) for n, v in enumerate(values)]
    return [*series, (T0 + (len(values) + 5) * 60_000, 0.0)]


def test_hovering_at_the_threshold_raises_once_and_clears_once() -> None:
    values = [70, 81, 79, 82, 78, 80.5, 76, 74, 70]  # between clear (75) and above (80) nothing changes
    assert run(minutes(values), [rule(above=80, clear=75)]) == [(RAISED, T0 + 60_000), (CLEARED, T0 + 7 * 60_000)]


def test_without_hysteresis_every_crossing_counts() -> None:
    assert [k for k, _ in run(minutes([70, 81, 79, 82, 78]), [rule(above=80)])] == [RAISED, CLEARED, RAISED, CLEARED]


def test_a_run_of_windows_before_raising() -> None:
    alerts = run(minutes([81, 70, 81, 82, 83, 70]), [rule(above=80, for_windows=3)])
    assert alerts == [(RAISED, T0 + 4 * 60_000), (CLEARED, T0 + 5 * 60_000)]


def test_below_rules_use_the_minimum_and_filters_select_devices() -> None:
    cold = rule(below=5, clear=8)
    assert [k for k, _ in run(minutes([10, 4, 6, 9]), [cold])] == [RAISED, CLEARED]
    assert run(minutes([10, 4, 6, 9]), [rule(below=5, devices=["oven-*"])]) == []
    assert run(minutes([10, 4]), [rule(below=5, factories=["f1"], lines=["l*"])]) == [(RAISED, T0 + 60_000)]


def test_a_window_is_judged_only_once_closed() -> None:
    open_window = [(T0 + 30_000, 90.0)]
    assert run(open_window, [rule(above=80)]) == []  # its end + grace is not behind the watermark yet


def test_an_hour_rule_uses_hour_windows() -> None:
    hours = [(T0 + h * 3_600_000 + 1000, v) for h, v in enumerate([90.0, 10.0])] + [(T0 + 3 * 3_600_000, 0.0)]
    assert [k for k, _ in run(hours, [rule(above=80, window_s=3600)])] == [RAISED, CLEARED]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([60.0, 76.0, 79.0, 81.0, 95.0]), min_size=3, max_size=25),
    per_minute=st.integers(1, 4),
    seed=st.integers(0, 10**6),
)
def test_readings_out_of_order_within_grace_raise_the_same_alerts(
    values: list[float], per_minute: int, seed: int
) -> None:
    """Property: shuffling readings by less than the grace period changes no alert."""
    rng = random.Random(seed)
    readings = [(T0 + n * 60_000 + k * (60_000 // per_minute), v + k) for n, v in enumerate(values)
                for k in range(per_minute)]  # fmt: skip
    shuffled = sorted(readings, key=lambda r: r[0] + rng.randrange(0, 50_000))  # < GRACE_S
    tail = [(readings[-1][0] + 10 * 60_000, 0.0)]
    rules = [
        rule(above=80, clear=77, for_windows=2),
        parse_rule("r2", {"name": "cold", "metric": "t", "below": 70}, SIZES),
        parse_rule("r3", {"name": "odd", "metric": "t", "anomaly": {"z": 1.5, "warmup": 3}}, SIZES),
    ]
    assert run(shuffled + tail, rules) == run(readings + tail, rules)


def test_alert_state_survives_the_changelog_and_replays_emit_the_same_alert() -> None:
    windows, policy, state = WindowPolicy(SIZES, GRACE_S, 3, 300), AlertPolicy([rule(above=80)], GRACE_S), DeviceState()
    windows.apply(state, [Reading("d", T0 + 1000, {"t": 90.0})], 1, ApplyResult())
    windows.apply(state, [Reading("d", T0 + 200_000, {"t": 10.0})], 2, ApplyResult())
    (alert,) = policy.evaluate("d", state, 2)
    again = DeviceState.loads(state.dumps())  # as a recovering worker reads it back
    assert policy.replayed(again, 2, -1) == [alert] and policy.evaluate("d", again, 2) == []
    assert policy.replayed(again, 2, 2) == []  # this worker wrote that batch itself
    policy.written(again, 2)
    assert policy.replayed(again, 2, -1) == [] and again.alerts == state.alerts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{name: a, metric: t}]", "rule 1 'a': give exactly one of above, below or anomaly"),
        ("rules: [{name: a, metric: t, above: 80, clear: 85}]", "clear \\(85\\) must be at or below above \\(80\\)"),
        ("rules: [{name: a, metric: t, below: 5, clear: 1}]", "clear \\(1\\) must be at or above below \\(5\\)"),
        ("rules: [{name: a, metric: t, above: 80, window_s: 5}]", "window_s 5 is not one of"),
        ("rules: [{name: a, metric: t, above: .nan}]", "above must be a finite number"),
        ("rules: [{name: a, metric: t, above: 1, for_windows: 0}]", "for_windows must be a whole number"),
        ("rules: [{name: a, metric: t, above: 1, colour: red}]", "unknown field 'colour'"),
        ("rules: [{name: 'a b', metric: t, above: 1}]", "name must be"),
        ("rules: [{name: a, metric: t, above: 1}, {name: a, metric: u, above: 2}]", "rule name 'a' is used twice"),
        ("rules: {name: a}", "expected a mapping with a list under 'rules'"),
        ("rules: [\n  - name: a\n   metric: t", "not YAML at line"),
    ],
)
def test_a_bad_rules_file_is_one_line_naming_file_rule_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=message) as caught:
        load_rules(path, SIZES)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_missing_rules_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="No such file"):
        load_rules(tmp_path / "nope.yaml", SIZES)


def anomaly(**spec: Any) -> Any:
    return parse_rule("rule 1", {"name": "odd", "metric": "t", "anomaly": {"z": 4, "warmup": 10, **spec}}, SIZES)


def test_an_anomaly_after_warm_up_raises_and_a_return_to_normal_clears() -> None:
    rng = random.Random(3)
    normal = [50 + rng.uniform(-1, 1) for _ in range(30)]
    alerts = run(minutes([*normal, 80.0, 50.0, 50.5]), [anomaly()])
    assert alerts == [(RAISED, T0 + 30 * 60_000), (CLEARED, T0 + 31 * 60_000)]


def test_no_anomaly_during_warm_up() -> None:
    assert run(minutes([50, 50.5, 49.5, 200, 50]), [anomaly(warmup=10)]) == []


def test_an_anomaly_rule_refuses_threshold_fields() -> None:
    with pytest.raises(RulesError, match="takes no above, below or clear"):
        parse_rule("rule 1", {"name": "odd", "metric": "t", "anomaly": {}, "above": 3}, SIZES)
    with pytest.raises(RulesError, match="alpha must lie between 0 and 1"):
        anomaly(alpha=1.5)
