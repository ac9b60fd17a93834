"""The places where millstream changes faust 0.15.3's own behaviour, each with its reason.

faust's per-event machinery, not millstream's work, limits a worker (``millstream bench``
measures both), so these are kept few, each a copy of faust's code with one change or one
setting faust gives no way to reach:

- :func:`set_fetch_max_wait`: faust fixes aiokafka's ``fetch_max_wait_ms`` at 1500; a broker
  that holds a fetch that long when no data is waiting delays every quiet-time record.
- :func:`install_lean_drain`: faust's fetch loop hands each record to the conductor inside
  ``Service.wait_first`` (four tasks and an ``asyncio.wait`` per record, about half of a bare
  agent's CPU per message). While flow is not suspended the lean loop awaits the delivery
  directly; while it is (a rebalance), it does exactly what faust does. Everything else in
  the loop (read offsets, gaps, commit_every) is faust's.
- :func:`configure_producer`: a produce request times out after the broker request timeout
  instead of faust's 1200 s, and the producer's metadata keeps every topic millstream writes
  to (aiokafka otherwise narrows it to the last topic a send found missing).
- :func:`producer_buffer_holds`: faust's producer buffer stops the streams while more than
  100 records wait in it; a batch writes up to one changelog record per message, so the bound
  is two batches' worth.
- :func:`spinner_only_on_a_terminal`: at log level warning or error faust's worker shows a
  progress spinner fed by every log record, so it lowers the root logger to DEBUG: each debug
  call in faust and aiokafka then builds a record (one per changelog send; 8% of a worker's CPU
  in ``millstream bench``), also when the output is a log file or a pod's stdout. The spinner
  now exists only when the output is a terminal.
- :class:`FaustSensor`: faust's Prometheus sensor, whose per-event hooks look up label
  children and normalise the stream's label on every event; here the children are cached.
  Same metrics, same values.

faust 0.15.3 and aiokafka 0.14.0 are pinned in pyproject.toml. The fetch-loop copy is
applied only to the faust release it was read from (on any other, faust's own loop runs and a
warning says so); the other patches set attributes of those two pinned releases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import faust
from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
from prometheus_client import REGISTRY

log = logging.getLogger(__name__)

PATCHED_RELEASE = "0.15.3"


def _release_matches(what: str) -> bool:
    if faust.__version__ == PATCHED_RELEASE:
        return True
    log.warning("faust %s is not %s: %s left as faust has it", faust.__version__, PATCHED_RELEASE, what)
    return False


def set_fetch_max_wait(milliseconds: int) -> None:
    """Make faust's aiokafka consumer wait at most ``milliseconds`` for fetch data."""
    from faust.transport.drivers import aiokafka as driver

    thread_class: Any = driver.AIOKafkaConsumerThread
    original = getattr(thread_class, "_millstream_original_create", thread_class._create_worker_consumer)

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = milliseconds  # read by consumer.start() for its fetcher
        return consumer

    thread_class._millstream_original_create = original
    thread_class._create_worker_consumer = create_worker_consumer


def configure_producer(request_timeout_s: float, topics: Callable[[Any], Iterable[str]]) -> None:
    """Two changes to the aiokafka producer faust builds, both found by the frozen-broker chaos
    scenario, where the producer (and with it every commit) stalled for 20 minutes:

    - A produce request unanswered for ``request_timeout_s`` times out; aiokafka then closes the
      connection and sends the batch again on a new one. faust's one 1200 s timeout also sets
      how long a batch is retried, which stays as it is.
    - The producer's metadata always covers ``topics(app)`` (the changelogs and the DLQ).
      aiokafka refreshes metadata for the topics it *tracks*, and it tracks a topic only once a
      send found it missing: after that, a refresh asks for that topic alone and forgets every
      other one. A changelog partition then has no leader, its batch waits out the 1200 s, and
      faust's one-at-a-time producer buffer waits behind it.
    """
    from faust.transport.drivers import aiokafka as driver

    producer_class: Any = driver.Producer
    original = getattr(producer_class, "_millstream_original_new", producer_class._new_producer)

    def new_producer(self: Any, transactional_id: str | None = None) -> Any:
        producer = original(self, transactional_id)
        milliseconds = int(request_timeout_s * 1000)
        producer.client._request_timeout_ms = milliseconds  # each connection's answer timeout
        producer._sender._request_timeout_ms = milliseconds  # the broker's ack timeout, sent with each request
        producer.client._topics.update(topics(self.app))
        return producer

    producer_class._millstream_original_new = original
    producer_class._new_producer = new_producer


def producer_buffer_holds(records: int) -> None:
    """faust's producer buffer holds up the conductor, and with it every stream, while more
    than 100 records wait in it (``ProducerBuffer.wait_until_ebb``), to bound the records a
    stream's table writes can queue. A millstream batch writes one changelog record per device
    it touched, up to a batch's messages, and waits for them all before it is committed, so the
    stream stopped for 0.1-0.16 s after every batch (the log's "producer buffer full"), and the
    messages arriving meanwhile waited that much longer. The bound becomes ``records``: what
    the two batches in memory at most can queue."""
    from faust.transport.producer import ProducerBuffer

    ProducerBuffer.max_messages = records


async def _lean_drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - the fetch loop
    # faust.transport.consumer.Consumer._drain_messages of 0.15.3; only the delivery differs.
    from faust.transport.consumer import CONSUMER_FETCHING

    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    flow_suspended = self.suspend_flow.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(CONSUMER_FETCHING)
            ait = cast(AsyncIterator[Any], getmany(timeout=1.0))
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if flow_suspended():
                            # A rebalance: faust abandons deliveries while flow is suspended.
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        else:
                            await callback(message)
                        set_read_offset(tp, offset)
                unset_flag(CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)


def install_lean_drain() -> None:
    """Replace faust's fetch loop with :func:`_lean_drain_messages` (idempotent)."""
    if not _release_matches("the fetch loop"):
        return
    from faust.transport import consumer

    consumer.Consumer._drain_messages = _lean_drain_messages  # type: ignore[method-assign]


def spinner_only_on_a_terminal() -> None:
    """No progress spinner (nor the DEBUG root logger it brings) unless stdout is a terminal."""
    worker_class: Any = faust.Worker
    original = getattr(worker_class, "_millstream_original_root_logger", worker_class.on_setup_root_logger)

    def on_setup_root_logger(self: Any, logger: logging.Logger, level: int) -> None:
        spinner = self.spinner
        if spinner is not None and not spinner.file.isatty():
            self.spinner = None
        original(self, logger, level)

    worker_class._millstream_original_root_logger = original
    worker_class.on_setup_root_logger = on_setup_root_logger


_METRICS: FaustMetrics | None = None


def faust_metrics() -> FaustMetrics:
    """faust's Prometheus series, registered once per process (a test may build several Apps)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = FaustMetrics.create(REGISTRY, "faust")
    return _METRICS


class FaustSensor(PrometheusMonitor):
    """faust's Prometheus sensor with the per-event label lookups cached."""

    def __init__(self, metrics: FaustMetrics, **kwargs: Any) -> None:
        super().__init__(metrics=metrics, **kwargs)
        self._by_topic: dict[str, Any] = {}
        self._by_partition: dict[Any, Any] = {}
        self._by_stream: dict[Any, Any] = {}
        self._sent_by_topic: dict[str, Any] = {}
        self._table_ops: dict[tuple[str, str], Any] = {}
        self._end_offsets: dict[Any, Any] = {}

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        # Monitor's bookkeeping, then PrometheusMonitor's four series (children cached).
        super(PrometheusMonitor, self).on_message_in(tp, offset, message)
        m = self._metrics
        m.messages_received.inc()
        m.active_messages.inc()
        topic = self._by_topic.get(tp.topic)
        if topic is None:
            topic = self._by_topic[tp.topic] = m.messages_received_per_topics.labels(topic=tp.topic)
        topic.inc()
        partition = self._by_partition.get(tp)
        if partition is None:
            partition = self._by_partition[tp] = m.messages_received_per_topics_partition.labels(
                topic=tp.topic, partition=tp.partition
            )
        partition.set(offset)

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict[str, Any] | None:
        state = super(PrometheusMonitor, self).on_stream_event_in(tp, offset, stream, event)
        m = self._metrics
        m.total_events.inc()
        m.total_active_events.inc()
        child = self._by_stream.get(stream)
        if child is None:
            label = f"stream.{self._stream_label(stream)}.events"
            child = self._by_stream[stream] = m.total_events_per_stream.labels(stream=label)
        child.inc()
        return state

    # Once per table read and write and per changelog send: one of each per device a batch
    # touches, so with many devices as many as there are messages.
    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> Any:
        child = self._sent_by_topic.get(topic)
        if child is None:
            child = self._sent_by_topic[topic] = self._metrics.topic_messages_sent.labels(topic=f"topic.{topic}")
        child.inc()
        self.messages_sent += 1  # Monitor's bookkeeping
        self.messages_sent_by_topic[topic] += 1
        return self.time()

    def on_table_get(self, table: Any, key: Any) -> None:
        self._table_or_create(table).keys_retrieved += 1
        self._table_op(table, self.KEYS_RETRIEVED).inc()

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        self._table_or_create(table).keys_updated += 1
        self._table_op(table, self.KEYS_UPDATED).inc()

    def _table_op(self, table: Any, operation: str) -> Any:
        child = self._table_ops.get((table.name, operation))
        if child is None:
            child = self._table_ops[(table.name, operation)] = self._metrics.table_operations.labels(
                table=f"table.{table.name}", operation=operation
            )
        return child

    def track_tp_end_offset(self, tp: Any, offset: int) -> None:
        self.tp_end_offsets[tp] = offset  # Monitor's bookkeeping
        child = self._end_offsets.get(tp)
        if child is None:
            child = self._end_offsets[tp] = self._metrics.topic_partition_end_offset.labels(
                topic=tp.topic, partition=tp.partition
            )
        child.set(offset)

    def _clear_partition_related_metrics(self) -> None:
        # faust removes the topic and partition children on a rebalance: drop the cached ones.
        super()._clear_partition_related_metrics()
        self._by_topic.clear()
        self._by_partition.clear()
        self._end_offsets.clear()
        self._sent_by_topic.clear()
