"""Window arithmetic, lateness, eviction, and exactness under replay after a crash."""

from __future__ import annotations

import math

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.windows import (
    COUNT,
    LAST,
    LAST_MS,
    MAX,
    MIN,
    OFFSET,
    SUM,
    ApplyResult,
    DeviceState,
    WindowKey,
    WindowPolicy,
)
from models.records import Reading

T0 = 1_705_314_600_000  # a minute boundary
policy = WindowPolicy([60, 3600], grace_s=10, retention_windows=2)


def reading(at_ms: int, **metrics: float) -> list[Reading]:
    return [Reading("d1", at_ms, dict(metrics))]


def apply_all(state: DeviceState, messages: list[tuple[int, list[Reading]]]) -> ApplyResult:
    result = ApplyResult()
    for offset, readings in messages:
        policy.apply(state, readings, offset, result)
    return result


def test_count_sum_min_max_last() -> None:
    state = DeviceState()
    apply_all(state, [(0, reading(T0 + 1000, t=5.0)), (1, reading(T0 + 3000, t=-2.0)), (2, reading(T0 + 2000, t=9.0))])
    agg = state.windows[WindowKey("t", 60, T0)]
    assert agg[COUNT] == 3 and agg[SUM] == 12.0 and agg[MIN] == -2.0 and agg[MAX] == 9.0
    # "last" is by event time: the out-of-order reading at +2 s does not replace the +3 s one.
    assert (agg[LAST], agg[LAST_MS], agg[OFFSET]) == (-2.0, T0 + 3000, 2)
    assert state.latest["t"] == [-2.0, T0 + 3000, 1]
    assert state.windows[WindowKey("t", 3600, T0 - T0 % 3_600_000)][COUNT] == 3


def test_replayed_offsets_are_skipped_but_reported_as_touched() -> None:
    state = DeviceState()
    apply_all(state, [(10, reading(T0, t=1.0)), (11, reading(T0 + 1000, t=2.0))])
    result = ApplyResult()
    policy.apply(state, reading(T0 + 1000, t=2.0), 11, result)
    assert result.applied is False
    assert state.windows[WindowKey("t", 60, T0)][COUNT] == 2
    assert WindowKey("t", 60, T0) in result.touched  # the upsert is repeated, the count is not


def test_late_readings_are_counted_not_applied() -> None:
    state = DeviceState()
    apply_all(state, [(0, reading(T0 + 80_000, t=1.0))])  # watermark: T0 + 80 s
    result = apply_all(state, [(1, reading(T0 + 5_000, t=100.0)), (2, reading(T0 + 75_000, t=3.0))])
    # The [T0, T0+60s) window ended 20 s before the watermark, grace is 10 s: late for 60 s.
    assert result.late == {60: 1}
    assert WindowKey("t", 60, T0) not in state.windows
    assert state.windows[WindowKey("t", 60, T0 + 60_000)][COUNT] == 2  # within grace: applied
    assert state.windows[WindowKey("t", 3600, T0 - T0 % 3_600_000)][SUM] == 104.0  # hour window still open


def test_eviction_keeps_recent_windows() -> None:
    state = DeviceState()
    apply_all(state, [(i, reading(T0 + i * 60_000, t=1.0)) for i in range(10)])
    evicted = policy.evict(state, written_through=9)
    minutes = sorted(k.start_ms for k in state.windows if k.size_s == 60)
    # Watermark T0+9 min: minute 9 is open, minute 8 is in its grace period, and the two
    # closed windows before them (retention_windows=2) stay; minutes 0-5 go.
    assert evicted == 6
    assert minutes == [T0 + m * 60_000 for m in (6, 7, 8, 9)]


def test_state_round_trips_through_bytes() -> None:
    state = DeviceState()
    apply_all(state, [(3, reading(T0, t=1.5, rpm=1400.0))])
    assert DeviceState.loads(state.dumps()) == state


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.tuples(st.integers(0, 600_000), st.floats(-1e6, 1e6)), min_size=1, max_size=40),
    crash=st.data(),
)
def test_crash_and_replay_gives_the_same_state(values: list[tuple[int, float]], crash: st.DataObject) -> None:
    """A crash restores the state as of some changelog write k >= the committed offset c, then
    replays from c. The result must equal processing every message exactly once."""
    messages = [(offset, reading(T0 + at, t=value)) for offset, (at, value) in enumerate(values)]
    straight = DeviceState()
    apply_all(straight, messages)

    committed = crash.draw(st.integers(0, len(messages)), label="committed")
    saved = crash.draw(st.integers(committed, len(messages)), label="changelog")
    state = DeviceState()
    apply_all(state, messages[:saved])
    restored = DeviceState.loads(state.dumps())
    apply_all(restored, messages[committed:])
    assert restored == straight


dedup_policy = WindowPolicy([60, 3600], grace_s=10, retention_windows=2, dedup_s=300)


def test_a_reading_resent_under_a_new_offset_counts_once() -> None:
    state, result = DeviceState(), ApplyResult()
    sent = [reading(T0 + 1000, t=1.0, h=50.0), reading(T0 + 2000, t=2.0), reading(T0 + 3000, t=3.0)]
    for offset, readings in enumerate(sent):
        dedup_policy.apply(state, readings, offset, result)
    # A bridge retry re-sends the first two (new offsets), and a new reading follows.
    for offset, readings in enumerate([sent[0], sent[1], reading(T0 + 4000, t=4.0)], start=3):
        dedup_policy.apply(state, readings, offset, result)
    agg = state.windows[WindowKey("t", 60, T0)]
    assert (agg[COUNT], agg[SUM]) == (4, 10.0)
    assert state.windows[WindowKey("h", 60, T0)][COUNT] == 1
    assert result.duplicates == 3  # t and h of the first, t of the second
    # Same metric and time, other metric: a different measurement, applied.
    dedup_policy.apply(state, reading(T0 + 2000, h=51.0), 6, result)
    assert state.windows[WindowKey("h", 60, T0)][COUNT] == 2


def test_dedup_survives_the_changelog_and_forgets_beyond_its_horizon() -> None:
    state = DeviceState()
    dedup_policy.apply(state, reading(T0 + 1000, t=1.0), 0, ApplyResult())
    state = DeviceState.loads(state.dumps())  # as after a restart, from the changelog
    result = ApplyResult()
    dedup_policy.apply(state, reading(T0 + 1000, t=1.0), 1, result)
    assert result.duplicates == 1 and state.windows[WindowKey("t", 3600, T0 - T0 % 3_600_000)][COUNT] == 1
    dedup_policy.apply(state, reading(T0 + 400_000, t=2.0), 2, result)
    dedup_policy.evict(state, written_through=2)
    assert state.recent["t"] == [T0 + 400_000]  # 1 s is more than 300 s behind: forgotten
    dedup_policy.apply(state, reading(T0 + 1000, t=1.0), 3, result)  # documented: counted again
    assert state.windows[WindowKey("t", 3600, T0 - T0 % 3_600_000)][COUNT] == 3


def test_recent_times_pack_shared_lists_once_and_read_the_old_format() -> None:
    state = DeviceState()
    metrics = {"t": 1.0, "rpm": 2.0, "p": 3.0}
    for offset in range(300):  # five minutes of one reading a second, as the simulator sends
        dedup_policy.apply(state, reading(T0 + offset * 1000 + offset % 7, **metrics), offset, ApplyResult())
    dedup_policy.apply(state, reading(T0 + 299_500, t=9.0), 300, ApplyResult())  # "t" alone: its own list
    packed = state.dumps()
    back = DeviceState.loads(packed)
    assert back == state and back.recent["t"] != back.recent["rpm"] == back.recent["p"]
    back.recent["rpm"].append(T0 + 400_000)  # lists unpacked from one group are separate lists
    assert back.recent["p"] != back.recent["rpm"]
    old = orjson.loads(packed)
    old["r"] = state.recent
    del old["q"]
    old_bytes = orjson.dumps(old)
    assert DeviceState.loads(old_bytes) == state  # a changelog written before the compact form
    assert len(packed) * 3 < len(old_bytes)


class ReadingByReading(WindowPolicy):
    """The general path only: what the in-order fast path must agree with."""

    def _apply_in_order(self, state: DeviceState, readings: list[Reading], offset: int, result: ApplyResult) -> bool:
        return False


def _same(fast: DeviceState, slow: DeviceState) -> None:
    assert fast.windows.keys() == slow.windows.keys()
    for key, agg in fast.windows.items():
        other = slow.windows[key]
        assert agg[:SUM] + agg[SUM + 1 :] == other[:SUM] + other[SUM + 1 :], key
        assert math.isclose(agg[SUM], other[SUM], rel_tol=1e-12, abs_tol=1e-9), key
    assert (fast.latest, fast.recent, fast.watermark_ms, fast.offset) == (
        slow.latest, slow.recent, slow.watermark_ms, slow.offset
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(st.tuples(st.integers(0, 7_200_000), st.floats(-1e3, 1e3)), max_size=15),
    gaps=st.lists(st.integers(1, 90_000), min_size=2, max_size=60),
    values=st.data(),
    ahead=st.integers(-20_000, 20_000),
)
def test_in_order_batches_agree_with_reading_by_reading(
    before: list[tuple[int, float]], gaps: list[int], values: st.DataObject, ahead: int
) -> None:
    policies = (
        WindowPolicy([60, 3600], grace_s=10, retention_windows=2, dedup_s=300),
        ReadingByReading([60, 3600], grace_s=10, retention_windows=2, dedup_s=300),
    )
    fast, slow = DeviceState(), DeviceState()
    for offset, (at, value) in enumerate(before):  # some history, in any order
        for policy, state in zip(policies, (fast, slow), strict=True):
            policy.apply(state, reading(T0 + at, t=value, rpm=value * 2), offset, ApplyResult())
    start = max([T0 + at for at, _ in before], default=T0) + ahead  # at, behind or ahead of the watermark
    times = [start + sum(gaps[: i + 1]) for i in range(len(gaps))]
    floats = st.floats(-1e6, 1e6, allow_nan=False)
    batch = [Reading("d1", at, {"t": values.draw(floats), "rpm": values.draw(floats)}) for at in times]
    results = []
    for policy, state in zip(policies, (fast, slow), strict=True):
        result = ApplyResult()
        policy.apply(state, [Reading(r.device_id, r.event_ms, dict(r.metrics)) for r in batch], 99, result)
        results.append(result)
    _same(fast, slow)
    assert results[0].touched == results[1].touched and results[0].latest_touched == results[1].latest_touched
    assert results[0].late == results[1].late and results[0].duplicates == results[1].duplicates


def test_a_metric_the_device_stops_sending_does_not_break_its_state() -> None:
    """Regression: eviction emptied the dropped metric's duplicate-detection list, and the next
    eviction (every later batch of the device, and every replay) raised IndexError."""
    state = DeviceState()
    dedup_policy.apply(state, reading(T0, t=1.0, h=2.0), 0, ApplyResult())
    for offset in range(1, 9):  # h unplugged, t goes on: 8 minutes > dedup_s (300 s)
        dedup_policy.apply(state, reading(T0 + offset * 60_000, t=1.0), offset, ApplyResult())
        dedup_policy.evict(state, written_through=offset)
    assert "h" not in state.recent and state.recent["t"]
    state = DeviceState.loads(state.dumps())
    dedup_policy.apply(state, reading(T0 + 9 * 60_000, t=1.0, h=3.0), 9, ApplyResult())  # h is back
    dedup_policy.evict(state, written_through=9)
    assert state.windows[WindowKey("h", 60, T0 + 9 * 60_000)][COUNT] == 1


def test_a_state_stored_with_an_emptied_list_still_loads_and_applies() -> None:
    """States written by the release with the IndexError can hold an empty list."""
    stored = orjson.dumps({"o": 4, "w": T0, "a": {}, "l": {}, "q": [[["h"], []], [["t"], [T0]]]})
    state = DeviceState.loads(stored)
    assert state.recent == {"t": [T0]}
    dedup_policy.apply(state, reading(T0 + 1000, h=1.0, t=2.0), 5, ApplyResult())
    dedup_policy.evict(state, written_through=5)
    assert state.recent == {"h": [T0 + 1000], "t": [T0, T0 + 1000]}


def test_a_window_leaves_the_state_only_once_its_last_change_is_written() -> None:
    """Regression: a window changed by a batch whose writes were still in flight could be
    evicted by the next batch; after a crash the replay found nothing to upsert."""
    state = DeviceState()
    apply_all(state, [(5, reading(T0, t=1.0)), (6, reading(T0 + 30 * 60_000, t=2.0))])
    minute = WindowKey("t", 60, T0)
    policy.evict(state, written_through=4)  # offset 5's write is in flight
    assert minute in state.windows
    policy.evict(state, written_through=5)
    assert minute not in state.windows


def test_latest_values_of_a_dropped_metric_are_evicted_behind_the_horizon() -> None:
    state = DeviceState()
    apply_all(state, [(0, reading(T0, h=1.0, t=1.0))])
    beyond = policy.horizon_ms + 60_000
    apply_all(state, [(1, reading(T0 + beyond, t=2.0))])
    policy.evict(state, written_through=-1)
    assert "h" in state.latest  # its last value's write is not confirmed yet
    policy.evict(state, written_through=1)
    assert set(state.latest) == {"t"}
    result = apply_all(state, [(2, reading(T0 + 1000, h=5.0))])  # older than what was evicted could be
    assert "h" not in state.latest and not result.latest_touched
    result = apply_all(state, [(3, reading(T0 + beyond - 1000, h=6.0))])  # inside the horizon: newer
    assert state.latest["h"] == [6.0, T0 + beyond - 1000, 3] and result.latest_touched == {"h"}
