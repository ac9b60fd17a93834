"""The worker's state store over faust's real RocksDB store (one database per partition).

Regression for the RocksDB aggregates: faust's RocksDB store reads a key from the database of
the *current event's* partition, and a batch task inherits the event its stream read last.
Reading without the key's own message as the current event found no state for devices of the
other partitions, and their aggregates restarted from empty after every large batch.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from faust.streams import _current_event

from agents.state import STATE_TABLE, TableStateStore, bytes_table
from app.settings import Settings
from models.records import SourceMessage


class Event:
    """What faust's store reads of the current event (weak-referenceable, as faust's is)."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(topic="telemetry", partition=partition, offset=0)


def event(partition: int) -> Event:
    return Event(partition)


def source(handle: Event) -> SourceMessage:
    return SourceMessage("telemetry", handle.message.partition, 0, b"dev", b"{}", 0, handle=handle)


@pytest.fixture
def table(tmp_path: Path) -> object:
    settings = Settings(store="rocksdb", data_dir=tmp_path)
    app = faust.App("state-store-test", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)
    return bytes_table(app, settings, STATE_TABLE, "window state per device")


def test_reads_the_partition_of_the_key_whatever_event_the_task_inherited(table: object) -> None:
    store = TableStateStore(table)
    owner = event(1)
    token = _current_event.set(weakref.ref(owner))
    try:
        table.data._set(b"dev", b"state")  # type: ignore[attr-defined]  # as a put in partition 1 stores it
    finally:
        _current_event.reset(token)
    inherited = event(3)  # the last event the stream read, of another partition
    token = _current_event.set(weakref.ref(inherited))
    try:
        assert store.get(b"dev", source(owner)) == b"state"
        assert _current_event.get()() is inherited  # type: ignore[misc]  # restored for the caller
    finally:
        _current_event.reset(token)


def test_each_partition_is_its_own_database(table: object) -> None:
    store = TableStateStore(table)
    one, two = event(1), event(2)
    for handle, value in ((one, b"one"), (two, b"two")):
        token = _current_event.set(weakref.ref(handle))
        try:
            table.data._set(b"dev", value)  # type: ignore[attr-defined]
        finally:
            _current_event.reset(token)
    assert store.get(b"dev", source(one)) == b"one"
    assert store.get(b"dev", source(two)) == b"two"
    assert store.get(b"dev", source(event(0))) is None
