"""The faust patches that change how faust builds its aiokafka producer (app/faust_patches.py);
tests/integration/test_kafka_smoke.py runs the same producer against the broker."""

from __future__ import annotations

from collections.abc import Iterator

import faust
import pytest
from faust.transport.drivers import aiokafka as driver

from app import faust_patches


@pytest.fixture
def restore_producer() -> Iterator[None]:
    original = driver.Producer._new_producer
    yield
    driver.Producer._new_producer = original  # type: ignore[method-assign]


async def test_producer_times_out_requests_and_tracks_the_topics_it_writes(restore_producer: None) -> None:
    for _ in range(2):  # as two apps in one process would: applied once, not stacked
        faust_patches.configure_producer(7.5, lambda app: [f"{app.conf.id}-dlq"])
    app = faust.App("patch-test", broker="kafka://127.0.0.1:9", producer_request_timeout=1200.0)
    producer = app.producer._new_producer()  # built, not started: no broker needed
    try:
        assert producer.client._request_timeout_ms == 7500  # each request's answer
        assert producer._sender._request_timeout_ms == 7500  # the broker's ack timeout
        assert producer._message_accumulator._batch_ttl == 1200.0  # how long a batch is retried
        assert producer.client._topics == {"patch-test-dlq"}
    finally:
        await producer.stop()
