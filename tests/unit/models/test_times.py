"""models/times.py against the datetime arithmetic it replaces, over the whole datetime range."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.times import iso_ms, millis_of

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
