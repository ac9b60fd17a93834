"""The faust patches that change how faust builds its aiokafka producer (app/faust_patches.py);
tests/integration/test_kafka_smoke.py runs the same producer against the broker."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_the_spinner_and_its_debug_root_logger_only_on_a_terminal(terminal: bool) -> None:
    original = faust.Worker.on_setup_root_logger
    try:
        for _ in range(2):  # applied once, not stacked
            faust_patches.spinner_only_on_a_terminal()
        app = faust.App("spinner-test", broker="kafka://127.0.0.1:9")
        worker = faust.Worker(app, stdout=_Terminal() if terminal else io.StringIO(), loglevel="warn")
        logger = logging.Logger("spinner-test-root", level=logging.WARNING)
        logger.addHandler(logging.StreamHandler(io.StringIO()))
        worker.on_setup_root_logger(logger, logging.WARNING)
        if terminal:  # faust's own behaviour: the spinner spins on every record
            assert worker.spinner is not None and logger.level == logging.DEBUG
        else:  # a log file or a pod's stdout: no spinner, and debug calls build no records
            assert worker.spinner is None and logger.level == logging.WARNING
            assert not logger.isEnabledFor(logging.DEBUG)
    finally:
        faust.Worker.on_setup_root_logger = original  # type: ignore[method-assign]


def test_the_sensor_with_cached_label_children_counts_what_fausts_counts() -> None:
    """Same calls into faust's PrometheusMonitor and into millstream's FaustSensor, each with a
    registry of its own: the same samples, also after a rebalance clears the topic series."""
    from types import SimpleNamespace

    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
    from faust.types import TP
    from prometheus_client import CollectorRegistry

    def drive(sensor: Any) -> None:
        table = SimpleNamespace(name="devices")
        tp = TP("telemetry", 3)
        for round_ in range(2):
            for i in range(5):
                sensor.on_table_get(table, b"k")
                sensor.on_table_set(table, b"k", b"v")
                sensor.on_send_initiated(None, "devices-changelog", None, 1, 1)
                sensor.track_tp_end_offset(tp, 100 * round_ + i)
            if not round_:
                sensor._clear_partition_related_metrics()  # as on a rebalance

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for metric in registry.collect() for s in metric.samples if not s.name.endswith("_created")
        }  # fmt: skip

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    plain = PrometheusMonitor(metrics=FaustMetrics.create(theirs, "faust"))
    cached = faust_patches.FaustSensor(metrics=FaustMetrics.create(ours, "faust"))
    drive(plain)
    drive(cached)
    assert samples(ours) == samples(theirs)
    assert ("faust_topic_messages_sent_total", (("topic", "topic.devices-changelog"),), 5.0) in samples(ours)
    assert cached.messages_sent == plain.messages_sent == 10
    assert cached.tp_end_offsets == plain.tp_end_offsets


async def test_the_producer_buffer_stops_the_streams_only_past_the_records_it_holds() -> None:
    """faust stops every stream while more than 100 records wait in its producer buffer
    (wait_until_ebb); a batch of 5,000 messages from 5,000 devices queues 5,000 changelog
    records, so the stream stopped after each batch. The bound is now what it is given."""
    from types import SimpleNamespace

    from faust.transport.producer import ProducerBuffer

    original = ProducerBuffer.max_messages
    assert original == 100  # faust's own bound, which the patch replaces
    try:
        faust_patches.producer_buffer_holds(500)
        buffer = ProducerBuffer()  # not started: nothing drains it
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]
        flushes: list[int | None] = []

        async def flush_atmost(max_messages: int | None) -> int:  # what stops the stream
            flushes.append(max_messages)
            return 0

        buffer.flush_atmost = flush_atmost  # type: ignore[method-assign]
        for record in range(500):
            buffer.put(record)  # type: ignore[arg-type]
        await buffer.wait_until_ebb()
        assert flushes == []  # 500 records wait: the stream goes on (faust's 100 would have stopped it)
        buffer.put(500)  # type: ignore[arg-type]
        await buffer.wait_until_ebb()
        assert flushes == [500]  # past the bound it waits, as faust does
    finally:
        ProducerBuffer.max_messages = original
