"""models/times.py against the datetime arithmetic it replaces, over the whole datetime range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.times import NoTimeZone, iso_ms, millis_of, ms_of_iso

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOWEST = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
HIGHEST = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


def reference_iso(millis: int) -> str:
    stamp = EPOCH + timedelta(milliseconds=millis)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.integers(LOWEST, HIGHEST))
def test_iso_ms_is_datetimes_isoformat(millis: int) -> None:
    assert iso_ms(millis) == reference_iso(millis)


@pytest.mark.parametrize("millis", [LOWEST, -1, 0, 1, 999, 86_399_999, 86_400_000, HIGHEST])
def test_iso_ms_edges(millis: int) -> None:
    # year 1, just before and at the epoch, a day's last and first millisecond, year 9999
    assert iso_ms(millis) == reference_iso(millis)


def test_iso_ms_outside_datetime_range_raises_like_datetime() -> None:
    for millis in (LOWEST - 1, HIGHEST + 86_400_000):
        with pytest.raises(OverflowError):
            reference_iso(millis)
        with pytest.raises(OverflowError):
            iso_ms(millis)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_millis_of_naive_utc(value: datetime) -> None:
    assert millis_of(value) == (value.replace(tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-14 * 60, 14 * 60),
)
def test_millis_of_aware(value: datetime, offset_min: int) -> None:
    aware = value.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    assert millis_of(aware) == (aware - EPOCH) // timedelta(milliseconds=1)


def test_millis_of_none_is_zero() -> None:
    assert millis_of(None) == 0


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-14 * 60, 14 * 60),
    st.sampled_from(["auto", "milliseconds", "microseconds", "seconds"]),
)
def test_ms_of_iso_is_the_exact_floor_of_any_iso_text_with_a_zone(value: datetime, offset_min: int, spec: str) -> None:
    aware = value.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    text = aware.isoformat(timespec=spec)
    if offset_min == 0 and spec != "auto":
        text = text.replace("+00:00", "Z")
    expected = (datetime.fromisoformat(text.replace("Z", "+00:00")) - EPOCH) // timedelta(milliseconds=1)
    assert ms_of_iso(text) == expected


def test_ms_of_iso_refuses_text_without_a_zone_or_not_iso() -> None:
    with pytest.raises(NoTimeZone):
        ms_of_iso("2026-12-03T08:00:00")
    for text in ("yesterday", "2026-13-01T00:00:00Z", ""):
        with pytest.raises(ValueError):
            ms_of_iso(text)
