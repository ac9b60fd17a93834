"""Reading a worker's /metrics: samples and histogram quantiles, as PromQL computes them."""

from __future__ import annotations

import math

import pytest

from app.tools.local import histogram_quantile, metric_value

SCRAPE = """# HELP millstream_ack_latency_seconds x
# TYPE millstream_ack_latency_seconds histogram
millstream_ack_latency_seconds_bucket{le="0.1"} 10.0
millstream_ack_latency_seconds_bucket{le="0.5"} 50.0
millstream_ack_latency_seconds_bucket{le="1.0"} 90.0
millstream_ack_latency_seconds_bucket{le="+Inf"} 100.0
millstream_ack_latency_seconds_count 100.0
millstream_messages_total{outcome="processed"} 1234.0
millstream_messages_total{outcome="rejected"} 5.0
millstream_acked_messages_total 1.5e+06
"""


def test_metric_value_picks_the_labelled_sample() -> None:
    assert metric_value(SCRAPE, "millstream_messages_total", 'outcome="rejected"') == 5
    assert metric_value(SCRAPE, "millstream_acked_messages_total") == 1_500_000
    assert metric_value(SCRAPE, "millstream_missing_total") == 0


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    assert histogram_quantile(SCRAPE, "millstream_ack_latency_seconds", 0.5) == pytest.approx(0.5)
    assert histogram_quantile(SCRAPE, "millstream_ack_latency_seconds", 0.3) == pytest.approx(
        0.3
    )  # 10..50 over 0.1..0.5
    assert histogram_quantile(SCRAPE, "millstream_ack_latency_seconds", 0.7) == pytest.approx(0.75)
    # Past the largest finite bucket only its bound is known.
    assert histogram_quantile(SCRAPE, "millstream_ack_latency_seconds", 0.99) == pytest.approx(1.0)
    assert math.isnan(histogram_quantile("", "millstream_ack_latency_seconds", 0.5))
