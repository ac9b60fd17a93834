"""The tansu broker behaves like Kafka where millstream relies on it: produce, group commit, resume."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.servers import TansuBroker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


async def _consume(bootstrap: str, topic: str, group: str, count: int) -> list[bytes]:
    """Read ``count`` messages as member of ``group``, commit them, leave the group."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=10_000,
    )  # fmt: skip
    await consumer.start()
    try:
        values: list[bytes] = []
        while len(values) < count:
            batch = await consumer.getmany(timeout_ms=1000, max_records=count - len(values))
            for records in batch.values():
                values.extend(r.value for r in records)
        await consumer.commit()
        return values
    finally:
        await consumer.stop()


async def test_group_resumes_from_committed_offset(kafka_broker: TansuBroker) -> None:
    topic, group = f"smoke-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
    finally:
        await producer.stop()

    first = await _consume(kafka_broker.bootstrap, topic, group, 12)
    assert first == [f"m{i}".encode() for i in range(12)]

    # A new member of the same group starts at the committed offset, not at the beginning.
    rest = await _consume(kafka_broker.bootstrap, topic, group, 8)
    assert rest == [f"m{i}".encode() for i in range(12, 20)]

    check = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group)
    await check.start()
    try:
        assert await check.committed(TopicPartition(topic, 0)) == 20
    finally:
        await check.stop()


async def test_worker_producer_keeps_its_topics_when_aiokafka_tracks_another(kafka_broker: TansuBroker) -> None:
    """aiokafka refreshes metadata only for the topics it tracks, and starts tracking a topic
    when a send finds it missing; from then on every other topic drops out of its metadata (a
    changelog partition without a leader stalled the frozen-broker chaos scenario). The
    producer faust builds for a worker tracks the changelogs and the DLQ from the start."""
    import faust
    from faust.transport.drivers import aiokafka as driver

    from app import faust_patches
    from app.main import produced_topics
    from app.settings import load_settings

    name = f"track-{uuid.uuid4().hex[:8]}"
    app = faust.App(name, broker=f"kafka://{kafka_broker.bootstrap}", store="memory://")
    app.Table("state", partitions=1)
    settings = load_settings()
    changelog, dlq, late = f"{name}-state-changelog", settings.kafka.dlq_topic, f"{name}-late"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in (changelog, late)])
        if dlq not in await admin.list_topics():
            await admin.create_topics([NewTopic(dlq, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    original = driver.Producer._new_producer
    plain = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        faust_patches.configure_producer(10.0, lambda app: produced_topics(app, settings))
        patched = app.producer._new_producer()
        for producer in (plain, patched):
            await producer.start()
            await producer.client.force_metadata_update()
            assert producer.client.cluster.partitions_for_topic(changelog) == {0}
            await producer.client.add_topic(late)  # what a send to a topic missing from metadata does
            await producer.client.force_metadata_update()
        # The pitfall is real (if aiokafka ever fixes it, this line says so) ...
        assert plain.client.cluster.partitions_for_topic(changelog) is None
        # ... and the worker's producer does not fall into it.
        assert patched.client.cluster.partitions_for_topic(changelog) == {0}
        assert patched.client.cluster.partitions_for_topic(dlq) == {0}
        await (await patched.send(changelog, b"v", key=b"k"))
    finally:
        driver.Producer._new_producer = original  # type: ignore[method-assign]
        await plain.stop()
        await patched.stop()
