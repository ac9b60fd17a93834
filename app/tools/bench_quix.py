"""The peer in ``millstream bench``: the same job in Quix Streams, run as its own process.

``python -m app.tools.bench_quix BOOTSTRAP TOPIC GROUP WORKDIR TOTAL`` reads TOTAL messages of
the bench's topic, decodes them (single-reading nested JSON and 50-reading batches, as the
bench's simulator makes them), keeps per-device tumbling windows of 1 minute and 1 hour with
count, sum, min, max and last per metric (Quix's RocksDB state with changelog topics, on by
default), writes one raw row per reading and metric to embedded ClickHouse (chdb, the same
table and columns as millstream's) through a ``BatchingSink``, and prints one JSON line: the
messages, readings, seconds and process CPU seconds from the first message to the end of the
final checkpoint (sinks flushed, offsets committed).

The peer is written as Quix's documentation shows (a ``StreamingDataFrame``, ``apply`` with
``expand``, ``set_timestamp``, ``tumbling_window().reduce().final()``, a ``BatchingSink``)
with its defaults: at-least-once, a checkpoint every 5 s. Two settings for the test broker
(tansu): ``session.timeout.ms`` 6000 (tansu answers a second JoinGroup only after half the
session timeout) and, in the bench, the source topic created with an explicit ``retention.ms``
(Quix derives its changelog topics' settings from it; tansu does not describe it otherwise).
Quix Streams is an optional dependency (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

WINDOWS_MS = (60_000, 3_600_000)  # millstream's default window sizes
GRACE_MS = 60_000  # millstream's default grace


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def readings(value: dict[str, Any]) -> list[dict[str, Any]]:
    """One message's readings, each {"ts": ms, "metrics": {...}, "device_id", "factory", "line"}."""
    device, factory, line = value["device_id"], value.get("factory", ""), value.get("line", "")
    if "readings" in value:
        return [
            {"device_id": device, "factory": factory, "line": line, "ts": int(r["ts"]), "metrics": r["metrics"]}
            for r in value["readings"]
        ]
    return [{"device_id": device, "factory": factory, "line": line, "ts": int(value["ts"] * 1000),
             "metrics": value["metrics"]}]  # fmt: skip


def fold(aggregate: dict[str, list[float]], reading: dict[str, Any]) -> dict[str, list[float]]:
    """count, sum, min, max, last per metric of one window."""
    for metric, value in reading["metrics"].items():
        kept = aggregate.get(metric)
        if kept is None:
            aggregate[metric] = [1, value, value, value, value]
        else:
            kept[0] += 1
            kept[1] += value
            kept[2] = min(kept[2], value)
            kept[3] = max(kept[3], value)
            kept[4] = value
    return aggregate


def start(reading: dict[str, Any]) -> dict[str, list[float]]:
    return fold({}, reading)


def main(argv: list[str]) -> None:
    from quixstreams import Application
    from quixstreams.sinks import BatchingSink, SinkBatch

    from sinks.clickhouse import COLUMNS, DDL_DATABASE, DDL_TABLE

    bootstrap, topic_name, group, workdir, total = argv[0], argv[1], argv[2], Path(argv[3]), int(argv[4])

    class ChdbRawSink(BatchingSink):
        """Raw rows to embedded ClickHouse, one INSERT per checkpoint and partition."""

        def setup(self) -> None:
            import orjson
            from chdb import session

            self._dumps = orjson.dumps
            open_session: Any = session.Session  # chdb ships without complete type hints
            self.db: Any = open_session(str(workdir / "clickhouse"))
            self.db.query(DDL_DATABASE.format(database="millstream"))
            self.db.query(DDL_TABLE.format(database="millstream", table="telemetry_raw"))
            self.insert = f"INSERT INTO millstream.telemetry_raw ({', '.join(COLUMNS)}) FORMAT JSONCompactEachRow\n"

        def write(self, batch: SinkBatch) -> None:
            now = int(time.time())
            rows = []
            for item in batch:
                reading = item.value
                event_ms = reading["ts"]
                for index, (metric, value) in enumerate(reading["metrics"].items()):
                    rows.append((reading["device_id"], reading["factory"], reading["line"], "", metric, value,
                                 event_ms // 1000, event_ms, now, batch.partition, item.offset, index))  # fmt: skip
            if rows:
                self.db.query(self.insert + self._dumps(rows)[1:-1].decode())

    app = Application(
        broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
        state_dir=str(workdir / "quix-state"), loglevel="WARNING",
        consumer_extra_config={"session.timeout.ms": 6000},  # tansu: see the module docstring
    )  # fmt: skip
    topic = app.topic(topic_name, value_deserializer="json", key_deserializer="str")
    clock: dict[str, float] = {"messages": 0, "readings": 0}

    def count(value: dict[str, Any]) -> None:
        if not clock["messages"]:
            clock["started"], clock["cpu_started"] = time.monotonic(), cpu_seconds()
        clock["messages"] += 1
        if clock["messages"] >= total:
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.update(count)
    sdf = sdf.apply(readings, expand=True)
    sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: value["ts"])
    sdf.sink(ChdbRawSink())
    for size in WINDOWS_MS:
        sdf.tumbling_window(duration_ms=size, grace_ms=GRACE_MS, name=f"w{size}").reduce(fold, start).final()
    app.run()
    seconds = time.monotonic() - clock.get("started", time.monotonic())
    print(json.dumps({"messages": int(clock["messages"]), "seconds": round(seconds, 3),
                      "cpu_s": round(cpu_seconds() - clock.get("cpu_started", 0.0), 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
