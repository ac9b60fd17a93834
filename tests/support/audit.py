"""Count what a deployment stored against what was sent, independently of millstream's code.

Used by the end-to-end tests and the chaos suite: raw rows in ClickHouse with and without
``FINAL``, DLQ records and their origins, every Scylla window aggregate and latest value
recomputed from the simulator's log, committed offsets.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy

from app.tools.simulator import Outgoing, SimulationLog, Simulator, UnrulySimulator
from tests.support.oracle import expected
from tests.support.world import World, committed_total, produce, read_dlq, read_topic

MAX_RESTARTS = 5  # a scenario whose workers restart more often than this is crash-looping


def simulate(
    messages: int, seed: int, *, devices: int = 200, malformed: float = 0.02, profile: str = "tidy"
) -> tuple[list[Outgoing], SimulationLog]:
    kind = UnrulySimulator if profile == "unruly" else Simulator
    sim = kind(devices=devices, seed=seed, malformed_ratio=malformed, late_ratio=0.01, out_of_order_ratio=0.03)
    traffic = list(sim.messages(messages)) + list(sim.flush())
    return traffic, sim.log


def stored_rows(world: World, final: bool = True) -> int:
    text = world.clickhouse.query(f"SELECT count() FROM {world.database}.telemetry_raw{' FINAL' if final else ''}")
    return int(text) if text.strip().isdigit() else -1


def table_exists(world: World) -> bool:
    return world.clickhouse.query(f"EXISTS TABLE {world.database}.telemetry_raw").strip() == "1"


def committed(world: World) -> int:
    return asyncio.run(committed_total(world.broker.bootstrap, f"{world.name}-group", world.topic))


def wait_until_complete(world: World, log: SimulationLog, sent: int, timeout: float = 180) -> float:
    """Until every message is committed and every row is in ClickHouse; returns seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    done = rows = -1
    while time.monotonic() < deadline:
        if len(world.restarts) > MAX_RESTARTS:
            index, code, tail = world.restarts[-1]
            raise AssertionError(f"crash loop: {len(world.restarts)} restarts; worker {index} exited {code}:\n{tail}")
        done, rows = committed(world), stored_rows(world)
        if done >= sent and rows >= log.expected_rows:
            return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"incomplete after {timeout}s: committed {done}/{sent}, rows {rows}/{log.expected_rows}")


def produce_in_background(world: World, traffic: list[Outgoing], rate: float) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: asyncio.run(produce(world.broker.bootstrap, world.topic, traffic, rate=rate)), daemon=True
    )
    thread.start()
    return thread


@dataclass
class Audit:
    """One scenario's count; ``ok`` is the customer's rule: nothing lost, nothing twice."""

    scenario: str
    store: str
    messages_sent: int
    readings_produced: int  # valid readings plus malformed messages
    valid_readings: int
    malformed_sent: int
    committed: int
    dlq_records: int
    dlq_origins: int  # distinct source (partition, offset) in the DLQ
    dlq_without_reason: int  # DLQ records missing the reason or detail header
    expected_rows: int
    rows_final: int
    rows_before_final: int
    duplicates_before_final: int
    duplicates_after_final: int
    lost: int
    aggregates_checked: int
    aggregates_wrong: int
    latest_checked: int
    latest_wrong: int
    worker_restarts: int  # restarts the scenario did not cause (a worker exited on its own)
    recovery_s: float
    alerts_expected: int = 0  # with alert rules (World.rules): worked out from the expected windows
    alerts_wrong: int = 0  # expected but not in ScyllaDB, in ScyllaDB but not expected, or not in the topic
    details: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates_after_final == 0
            and self.aggregates_wrong == 0
            and self.latest_wrong == 0
            and self.committed == self.messages_sent
            and self.dlq_origins == self.malformed_sent
            and self.dlq_without_reason == 0
            and self.worker_restarts == 0
            and self.alerts_wrong == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def audit(world: World, log: SimulationLog, sent: int, *, scenario: str, recovery_s: float,
          malformed_extra: int = 0) -> Audit:  # fmt: skip
    """Count everything; ``malformed_extra`` are bad messages sent besides the simulator's."""
    malformed = log.malformed + malformed_extra
    final, raw = stored_rows(world), stored_rows(world, final=False)
    records = asyncio.run(read_dlq(world.broker.bootstrap, world.dlq_topic, malformed))
    origins = {
        (dict(r.headers)["millstream.source.partition"], dict(r.headers)["millstream.source.offset"]) for r in records
    }
    reasons: dict[str, int] = {}
    without_reason = truncated = 0
    for record in records:
        headers = dict(record.headers)
        truncated += "millstream.truncated" in headers
        reason = headers.get("millstream.reason", b"").decode()
        if not reason or not headers.get("millstream.detail"):
            without_reason += 1
        reasons[reason] = reasons.get(reason, 0) + 1
    examples: list[str] = []
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    cluster = Cluster(
        ["127.0.0.1"],
        port=world.cql.port,
        protocol_version=4,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        **world.cql_options,
    )
    session = cluster.connect()
    try:
        windows = {
            (r.device_id, r.metric, r.window_size_s, int(r.window_start.timestamp() * 1000)): r
            for r in session.execute(f"SELECT * FROM {world.name}.window_aggregates")
        }
        latest = {(r.device_id, r.metric): r for r in session.execute(f"SELECT * FROM {world.name}.latest_values")}
    finally:
        cluster.shutdown()
    want = expected(log.readings)
    wrong = len(set(windows) ^ set(want.windows))
    for key in set(windows) ^ set(want.windows):
        examples.append(f"window {key}: {'missing' if key in want.windows else 'unexpected'}")
    for key, (count, total, low, high, last, _last_ms) in want.windows.items():
        row = windows.get(key)
        if row is None:
            continue
        if (row.count, row.min, row.max, row.last_value) != (count, low, high, last) or not math.isclose(
            row.sum, total, rel_tol=1e-9, abs_tol=1e-9
        ):
            wrong += 1
            examples.append(f"window {key}: stored {(row.count, row.sum)} expected {(count, total)}")
    want_latest = want.latest
    got_latest = {k: (r.value, int(r.event_time.timestamp() * 1000)) for k, r in latest.items()}
    latest_wrong = sum(1 for k in set(want_latest) | set(got_latest) if want_latest.get(k) != got_latest.get(k))
    for key in [k for k in set(want_latest) | set(got_latest) if want_latest.get(k) != got_latest.get(k)][:3]:
        examples.append(f"latest {key}: stored {got_latest.get(key)} expected {want_latest.get(key)}")
    details: dict[str, Any] = {"dlq_reasons": dict(sorted(reasons.items()))}
    if truncated:
        details["dlq_truncated"] = truncated
    if log.malformed_kinds:
        details["bad_input_sent"] = dict(sorted(log.malformed_kinds.items()))
    if world.restarts:
        details["restart_exit_codes"] = [code for _, code, _ in world.restarts]
    alerts_expected = alerts_wrong = 0
    if world.rules is not None:
        alerts_expected, alerts_wrong = audit_alerts(world, want, examples, details)
    return Audit(
        scenario=scenario,
        store=world.store,
        messages_sent=sent,
        readings_produced=log.valid_readings + malformed,
        valid_readings=log.valid_readings,
        malformed_sent=malformed,
        committed=committed(world),
        dlq_records=len(records),
        dlq_origins=len(origins),
        dlq_without_reason=without_reason,
        expected_rows=log.expected_rows,
        rows_final=final,
        rows_before_final=raw,
        duplicates_before_final=max(0, raw - final),
        duplicates_after_final=max(0, final - log.expected_rows),
        lost=max(0, log.expected_rows - final),
        aggregates_checked=len(want.windows),
        aggregates_wrong=wrong,
        latest_checked=len(want_latest),
        latest_wrong=latest_wrong,
        worker_restarts=len(world.restarts),
        recovery_s=round(recovery_s, 1),
        alerts_expected=alerts_expected,
        alerts_wrong=alerts_wrong,
        details=details,
        examples=examples[:5],
    )


def audit_alerts(world: World, want: Any, examples: list[str], details: dict[str, Any]) -> tuple[int, int]:
    """Alerts in ScyllaDB against those worked out from the expected windows; every stored alert
    in the topic too (a repeat there after a crash carries the same id, and counts once)."""
    import json

    from tests.support.oracle import expected_alerts

    assert world.rules is not None
    wanted = expected_alerts(want, world.rules)
    rows = world.cql.rows(world.name, "alerts_by_device")
    stored = {(r["device_id"], r["rule"], r["state"], _epoch_ms(r["window_start"])) for r in rows}
    records = asyncio.run(read_topic(world.broker.bootstrap, world.alerts_topic, len(rows), wait_s=10))
    topic_ids = [json.loads(r.value)["alert_id"] for r in records]
    missing_in_topic = {r["alert_id"] for r in rows} - set(topic_ids)
    wrong = len(wanted ^ stored) + len(rows) - len(stored) + len(missing_in_topic)
    examples += [f"alert {a}: missing" for a in sorted(wanted - stored)[:3]]
    examples += [f"alert {a}: unexpected" for a in sorted(stored - wanted)[:3]]
    details["alerts"] = {"expected": len(wanted), "stored": len(rows), "topic_records": len(topic_ids),
                         "topic_repeats": len(topic_ids) - len(set(topic_ids))}  # fmt: skip
    return len(wanted), wrong


def _epoch_ms(value: Any) -> int:
    """A timestamp cell as the CQL server decodes it (a datetime, naive meaning UTC, or an int)."""
    import calendar

    if isinstance(value, int):
        return value
    return calendar.timegm(value.utctimetuple()) * 1000 + value.microsecond // 1000
