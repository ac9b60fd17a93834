"""Per-device state in changelog-backed faust tables, and what it takes to trust them.

Two tables, partitioned like the source topic (key = device id): the window state of every
device (:mod:`agents.windows`) and, per source partition, the highest offset dead-lettered.
Their values are millstream's own bytes. faust's stores, its RocksDB store above all, need the
current event to find a key's partition, and faust's flush before a commit does not wait for
every changelog record: :class:`TableStateStore` and :class:`ChangelogAcks` handle both.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import faust
from faust.streams import _current_event

from app.settings import Settings
from models.records import SourceMessage

STATE_TABLE = "device-windows"
DLQ_PROGRESS_TABLE = "dlq-progress"


def table_options(settings: Settings) -> dict[str, Any]:
    """RocksDB options for every table: faust's default block cache is 2 GiB per partition DB."""
    cache = settings.rocksdb_block_cache_mb * 1024 * 1024
    return {"block_cache_size": cache, "block_cache_compressed_size": cache // 4, "write_buffer_size": cache // 2}


def bytes_table(app: faust.App, settings: Settings, name: str, help: str) -> Any:
    """A changelog-backed table of bytes to bytes, partitioned like the source topic."""
    options: dict[str, Any] = {}
    if settings.store == "rocksdb":
        options["options"] = table_options(settings)
    table = app.Table(
        name, default=None, partitions=settings.kafka.partitions, key_type=bytes, value_type=bytes, help=help,
        **options,
    )  # fmt: skip
    # faust tables pick "json" for any non-Record type and pass bytes through unencoded on
    # write, but decode the changelog as JSON on recovery; keep both sides raw (before the
    # changelog topic is first built).
    table.key_serializer = table.value_serializer = "raw"  # type: ignore[attr-defined]
    return table


class TableStateStore:
    """Window state in a changelog-backed faust table keyed by device id (bytes).

    faust's stores find a key's partition from the *current event*: the RocksDB store reads
    and writes only the database of that event's partition, and the changelog record goes to
    that partition. A batch task inherits whatever event its stream read last, usually of
    another partition, so both reads and writes run with the key's own message as the current
    event. (Reading without it found no state for most devices and restarted their aggregates
    from empty: the RocksDB aggregates were wrong after every large batch.)
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None:
        token = _current_event.set(weakref.ref(source.handle))
        try:
            value = self.table.get(device_key)
        finally:
            _current_event.reset(token)
        return value if value is None else bytes(value)

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        token = _current_event.set(weakref.ref(source.handle))
        try:
            self.table[device_key] = value
        finally:
            _current_event.reset(token)


class ChangelogAcks:
    """The changelog records of millstream's tables, as futures of their acknowledgements.

    faust's flush before a commit does not wait for them all: its producer buffer's flush
    returns once no record has left the buffer for 0.1 s (a busy event loop is enough), and
    aiokafka's flush cannot see records still in that buffer. A commit could then go out
    before the state it covers, and a worker killed right after lost that state for good
    (found by the rebalance chaos scenario on RocksDB: one device's windows short by eleven
    messages). So the pipeline waits for a batch's records itself before the batch's offsets
    become committable.
    """

    def __init__(self) -> None:
        self._pending: list[Any] = []

    def track(self, table: Any) -> None:
        send = table.send_changelog

        def send_changelog(*args: Any, **kwargs: Any) -> Any:
            future = send(*args, **kwargs)
            self._pending.append(future)
            return future

        table.send_changelog = send_changelog

    def take(self) -> list[Any]:
        pending, self._pending = self._pending, []
        return pending


@dataclass(frozen=True)
class Tables:
    """The worker's tables, as the pipeline uses them."""

    windows: TableStateStore  # window state per device
    dlq_progress: TableStateStore  # highest source offset dead-lettered per partition
    acks: ChangelogAcks  # their changelog records, to wait for before a commit


def declare_tables(app: faust.App, settings: Settings) -> Tables:
    windows = bytes_table(app, settings, STATE_TABLE, "window state per device")
    progress = bytes_table(app, settings, DLQ_PROGRESS_TABLE, "highest source offset dead-lettered per partition")
    acks = ChangelogAcks()
    acks.track(windows)
    acks.track(progress)
    return Tables(TableStateStore(windows), TableStateStore(progress), acks)
