"""The lookup API's parameters and answers, without a server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.windows import DeviceState, WindowKey
from app.lookup import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    BadRequest,
    alerts_answer,
    alerts_query,
    check_device,
    from_state,
    parse_time,
    window_query,
    windows_answer,
)
from models.times import MAX_MS, MIN_MS

NOW = 1_796_272_229_607
SIZES = [60, 3600]


def test_defaults_are_the_last_day_of_the_smallest_size() -> None:
    query = window_query({"metric": "temperature"}, SIZES, NOW)
    assert (query.size_s, query.to_ms - query.from_ms, query.limit) == (60, 24 * 3_600_000, DEFAULT_LIMIT)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "metric is required"),
        ({"metric": "t", "size": "7"}, "size: '7' is not a window size of this service [60, 3600]"),
        ({"metric": "t", "size": "-60"}, "size: '-60'"),
        ({"metric": "t", "limit": "0"}, f"limit: '0' is not a whole number from 1 to {MAX_LIMIT}"),
        ({"metric": "t", "limit": str(MAX_LIMIT + 1)}, "limit:"),
        ({"metric": "t", "from": "yesterday"}, "from: 'yesterday' is neither ISO-8601 nor epoch milliseconds"),
        ({"metric": "t", "to": "2026-12-03T10:00:00"}, "to: '2026-12-03T10:00:00' has no time zone"),
        ({"metric": "t", "from": "2026-12-03T10:00:00Z", "to": "2026-12-03T09:00:00Z"}, "from must be before to"),
        ({"metric": "t", "device": "x"}, "unknown parameter 'device'"),
    ],
)
def test_bad_parameters_are_refused_with_a_message_naming_them(params: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        window_query(params, SIZES, NOW)


@pytest.mark.parametrize("device", ["", "  ", "x" * 129, "a\x00b"])
def test_bad_device_ids_are_refused(device: str) -> None:
    with pytest.raises(BadRequest):
        check_device(device, 128)


def test_times_are_iso_with_a_zone_or_epoch_milliseconds() -> None:
    assert parse_time("to", "2026-12-03T10:00:00Z") == parse_time("to", "2026-12-03T11:00:00+01:00")
    assert parse_time("to", "1796272229607") == 1796272229607


def test_times_outside_years_1_to_9999_are_refused() -> None:
    assert (parse_time("from", str(MIN_MS)), parse_time("to", str(MAX_MS))) == (MIN_MS, MAX_MS)
    for text in (str(MIN_MS - 1), str(MAX_MS + 1), "-9999999999999999", "9999999999999999"):
        with pytest.raises(BadRequest, match=f"to: {text} is outside years 1-9999 UTC"):
            parse_time("to", text)


BOUNDS = st.one_of(
    st.integers(-(10**16) + 1, 10**16 - 1).map(str),
    st.sampled_from(["0001-01-01T00:00:00Z", "0001-01-01T00:30:00+01:00", "9999-12-31T23:59:59.999Z"]),
)


@given(bounds=st.dictionaries(st.sampled_from(["from", "to"]), BOUNDS))
def test_every_span_the_api_takes_can_be_answered(bounds: dict[str, str]) -> None:
    """Found by this test: 16-digit epoch milliseconds and a ``to`` in year 1 (its default
    ``from`` a day earlier) were taken, then the answer could not write them (a 500)."""
    try:
        query, alerts = window_query({"metric": "t", **bounds}, SIZES, NOW), alerts_query(bounds, NOW)
    except BadRequest:
        return
    assert MIN_MS <= query.from_ms < query.to_ms <= MAX_MS + 1
    windows_answer("dev", query, [], "table")
    alerts_answer("dev", alerts, [], "table")


def state_with(windows: int) -> DeviceState:
    state = DeviceState()
    for n in range(windows):
        start = NOW - NOW % 60_000 - n * 60_000
        state.windows[WindowKey("t", 60, start)] = [2, 3.0, 1.0, 2.0, 2.0, start + 1000, n]
        state.windows[WindowKey("h", 60, start)] = [1, 5.0, 5.0, 5.0, 5.0, start + 1000, n]
    state.latest = {"t": [2.0, NOW, 9], "h": [5.0, NOW, 9]}
    return state


@given(windows=st.integers(0, 40), limit=st.integers(1, 15))
def test_paging_walks_every_window_once_newest_first(windows: int, limit: int) -> None:
    state = state_with(windows)
    query = window_query({"metric": "t", "limit": str(limit)}, SIZES, NOW)
    seen: list[int] = []
    while True:
        rows = from_state(state, query)
        answer = windows_answer("dev", query, rows, "table")
        seen += [row[0] for row in rows]
        if answer["next"] is None:
            break
        params = dict(part.split("=") for part in answer["next"].split("?", 1)[1].split("&"))
        query = window_query(params, SIZES, NOW)
    assert seen == sorted({k.start_ms for k in state.windows if k.metric == "t"}, reverse=True)


def test_a_window_answer_carries_the_aggregates_and_the_mean() -> None:
    query = window_query({"metric": "t", "limit": "1"}, SIZES, NOW)
    (window,) = windows_answer("dev", query, from_state(state_with(3), query), "table")["windows"]
    assert (window["count"], window["sum"], window["min"], window["max"], window["mean"]) == (2, 3.0, 1.0, 2.0, 1.5)
    assert window["start"].endswith("Z") and window["end"] > window["start"]
