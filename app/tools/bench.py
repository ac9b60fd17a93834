"""``millstream bench``: millstream against its limits, in one run on one broker and machine.

Phases, each on data produced once before any is timed:

1. ceiling   - a plain aiokafka consumer reads the single-reading topic (one process's limit);
2. bare      - a faust agent that only counts reads the same topic (the framework floor),
               once with faust as installed and once with the faust tuning the worker
               applies (app/faust_patches.py, cython_optimizations, a larger stream buffer);
3. pipeline  - ``millstream worker`` (decode, validate, windows, sinks, commit after write)
               reads the same topic, writing raw rows to ClickHouse and aggregates to
               ScyllaDB (the CQL test server of a checkout, or ``--scylla HOSTS``), as
               production does;
4. batched   - a worker reads messages of ``--batch-size`` readings each, to both stores;
5. latency   - a worker reads a topic fed live at half the pipeline's rate; the producer's
               record timestamp to the ack after both writes, from the worker's histogram;
6. devices   - the device-count sweep: a worker writing aggregates to the same ScyllaDB reads
               single-reading messages from 200 to 100,000 devices (``--sweep-devices``), and
               once more at 20,000 without ScyllaDB, for ScyllaDB's share of the CPU. With
               many devices a message touches aggregate rows and a device state of its own
               instead of folding into a few.
               Last, the smallest point again while ``millstream api`` answers lookups about
               its devices from the same ScyllaDB, on and off in phases (ApiLoad).

Rates are timed from the first scrape that sees progress to the scrape that sees the last
message, so start-up (group join, table recovery, sink DDL) is not counted for anyone.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.tools.broker import EmbeddedBroker, create_topics, free_port, stop_process
from app.tools.local import LocalWorker, WorkerChild, cpu_seconds, histogram_quantile, metric_value, rss_mb
from app.tools.simulator import Simulator, send_paced

POLL_S = 0.25  # worker /metrics scrapes: each costs the worker a little CPU
BARE_POLL_S = 0.1  # the bare agents' /count costs nothing: finer timing for the shorter runs
LATENCY_FETCH_WAIT_MS = 50
PRODUCER_OPTIONS: dict[str, Any] = {"linger_ms": 10, "max_batch_size": 1_048_576, "acks": "all"}
GOALS: dict[str, tuple[str, float]] = {
    # key: (comparison, goal) from DESIGN.md
    "pipeline_vs_bare_ratio": (">=", 0.8),
    "batched_readings_per_s": (">=", 200_000),
    "latency_p99_s": ("<=", 1.0),
    "rows_per_insert": (">=", 10_000),
    "rss_growth_ratio": ("<=", 1.1),
    "device_scaling_ratio": (">=", 0.7),
    "scylla_cpu_us_per_row": ("<=", 30),
    "pipeline_vs_quix_ratio": (">=", 1.0),
    "batched_vs_quix_ratio": (">=", 1.0),
    # issue 15: ingestion must not slow measurably while the lookup API is queried (measured
    # directly, A-B-A-B, and from the cost of a query: at most a tenth of the ingestion's CPU)
    "api_load_cpu_ratio": (">=", 0.9),
    "api_cpu_share": ("<=", 0.1),
}
# Quix Streams derives its changelog topics' settings from the source topic's retention.ms,
# which tansu describes only when the topic was created with it (7 days, Kafka's default).
TOPIC_CONFIGS = {"retention.ms": "604800000"}
API_QUERIES_PER_S = 50.0  # lookup API requests a second during the query-load point of the sweep
SCALING_DEVICES = 20_000  # device_scaling_ratio: the rate here (or the largest point below) / the smallest point


@dataclass
class BenchOptions:
    messages: int = 100_000
    batched_messages: int = 4_000
    batch_size: int = 50
    devices: int = 200
    partitions: int = 4
    latency_seconds: float = 15.0
    clickhouse_url: str | None = None  # default: embedded ClickHouse (chdb), one store per phase
    sweep_devices: tuple[int, ...] = (200, 2_000, 20_000, 100_000)  # empty: no sweep
    sweep_messages: int = 30_000  # per point, and at least one per device
    scylla: str | None = None  # host[:port],...; default: the CQL test server of a checkout
    api_seconds: float = 60.0  # the lookup API point's ingestion, sized from the smallest point's rate


@dataclass
class RateClock:
    """Times a consumer from when it is ready (assigned, recovered, sinks connected) to done.

    ``ready`` is the midpoint between the last poll that saw it unready and the first that saw
    it ready; ``done`` the first poll that saw every message. Polls are POLL_S apart.
    """

    ready: float = math.nan
    done: float = math.nan
    total: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (messages done, MiB)
    cpu_ready: float = math.nan  # the consumer process's CPU seconds (all threads) at ready
    cpu_done: float = math.nan
    # (time, messages acked, sum of the worker's batch CPU seconds), for phase_split
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    query_cpu_us: float = math.nan  # millstream api's CPU per query, measured alone (the query-load point)
    api: ApiLoad | None = None  # the lookup API client of the query-load point

    def rate(self) -> float:
        return self.total / (self.done - self.ready) if self.done > self.ready else math.nan

    def cpu_us_per_message(self) -> float:
        """CPU per message, steadier than wall-clock rates on a shared machine."""
        return (self.cpu_done - self.cpu_ready) / self.total * 1e6 if self.total else math.nan


def _wait_ready(is_ready: Callable[[], bool], alive: Callable[[], None], limit_s: float) -> float:
    unready, deadline = time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        alive()
        try:
            ready = is_ready()
        except OSError:
            ready = False
        now = time.monotonic()
        if ready:
            return (unready + now) / 2
        unready = now
        time.sleep(POLL_S / 2)
    raise RuntimeError(f"not ready within {limit_s:.0f}s")


def _messages(options: BenchOptions, *, batched: bool, count: int, seed: int) -> list[tuple[bytes, bytes]]:
    simulator = Simulator(
        devices=options.devices, seed=seed, malformed_ratio=0.0, late_ratio=0.0, out_of_order_ratio=0.0,
        batch_size=options.batch_size if batched else 1, formats=("batched",) if batched else ("nested",),
    )  # fmt: skip
    return [(item[0], item[1]) for item in simulator.messages(count)]  # tidy: no record timestamps


async def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float | None) -> float:
    """Send ``messages``; paced to ``rate`` per second if given. Returns messages per second."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_OPTIONS)
    await producer.start()
    started = time.monotonic()
    try:
        await send_paced(producer, topic, messages, rate=rate)
    finally:
        await producer.stop()
    return len(messages) / (time.monotonic() - started)


async def _consume_ceiling(bootstrap: str, topic: str, total: int, limit_s: float) -> float:
    """A plain aiokafka consumer (no group, no commits): messages per second."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        seen, started, deadline = 0, time.monotonic(), time.monotonic() + limit_s
        while seen < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the plain consumer read {seen}/{total} messages in {limit_s:.0f}s")
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            seen += sum(len(records) for records in batches.values())
        return total / (time.monotonic() - started)
    finally:
        await consumer.stop()


class _MemoryStore:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, device_key: bytes, source: object) -> bytes | None:
        return self.data.get(device_key)

    def put(self, device_key: bytes, value: bytes, source: object) -> None:
        self.data[device_key] = value


class _NullSink:
    name = "null"

    async def write(self, batch: object) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _NullDeadLetters:
    async def send(self, messages: object) -> None:
        return None


def pipeline_cpu(messages: list[tuple[bytes, bytes]], batch: int) -> tuple[float, float]:
    """millstream's own work without Kafka, faust or sinks: decode, validate, windows (with
    duplicate detection), rows, in batches of ``batch``. Returns (messages/s, readings/s)."""
    from agents.pipeline import Pipeline
    from agents.windows import WindowPolicy
    from app.settings import WindowSettings
    from models.decode import Decoder
    from models.records import SourceMessage
    from sinks.base import RetryPolicy

    windows = WindowSettings()  # the defaults a worker runs with
    pipeline = Pipeline(
        decoder=Decoder(), windows=WindowPolicy(windows.sizes_s, windows.grace_s, windows.retention_windows,
                                                windows.dedup_s),
        state=_MemoryStore(), raw_sink=_NullSink(), aggregate_sink=_NullSink(), dead_letters=_NullDeadLetters(),
        retry=RetryPolicy(budget_s=10), dlq_max_consecutive=1_000_000,
    )  # fmt: skip
    now_ms = int(time.time() * 1000)
    source = [
        SourceMessage("bench", zlib.crc32(key) % 4, offset, key, value, now_ms)
        for offset, (key, value) in enumerate(messages)
    ]

    async def run() -> float:
        started = time.perf_counter()
        for first in range(0, len(source), batch):
            await pipeline.process(source[first : first + batch])
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    readings = sum(len(m.readings) for m in source)
    return len(source) / elapsed, readings / elapsed


class Bench:
    def __init__(self, options: BenchOptions, workdir: Path, say: Callable[[str], None]) -> None:
        self.options, self.workdir, self.say = options, workdir, say
        self.rate_hint = 0.0  # msgs/s of the full pipeline (phase 3): sizes the lookup API point
        self.broker = EmbeddedBroker(workdir / "broker.log")
        self.children: list[Callable[[], object]] = []  # what stops each child process

    def _clickhouse_url(self, phase: str) -> str:
        return self.options.clickhouse_url or f"chdb://{self.workdir / ('clickhouse-' + phase)}"

    def run(self) -> dict[str, Any]:
        """Every phase, in the order they run and are reported: one long function on purpose, so
        that what is measured, and in which order on the one machine, reads top to bottom."""
        o = self.options
        self.say(f"starting the bundled broker (tansu); work files in {self.workdir}")
        self.broker.start()
        bootstrap = self.broker.bootstrap
        topics = ["bench-single", "bench-batched", "bench-live"]
        asyncio.run(create_topics(topics, partitions=o.partitions, configs=TOPIC_CONFIGS, bootstrap_servers=bootstrap))
        self.say(f"generating and producing {o.messages} single-reading messages from {o.devices} devices")
        single = _messages(o, batched=False, count=o.messages, seed=1)
        produce_rate = asyncio.run(_produce(bootstrap, "bench-single", single, None))
        self.say(f"produced at {produce_rate:,.0f} msgs/s; {o.batched_messages} messages of {o.batch_size} readings")
        batched = _messages(o, batched=True, count=o.batched_messages, seed=2)
        asyncio.run(_produce(bootstrap, "bench-batched", batched, None))
        batched_readings = o.batched_messages * o.batch_size
        cpu_msgs, _ = pipeline_cpu(single, 5000)
        _, cpu_readings = pipeline_cpu(batched, max(1, 4 * 1024 * 1024 // 4000))
        self.say(f"millstream's own work alone: {cpu_msgs:,.0f} msgs/s, {cpu_readings:,.0f} readings/s batched")
        del single, batched

        self.say("1/7 ceiling: plain aiokafka consumer")
        ceiling = asyncio.run(_consume_ceiling(bootstrap, "bench-single", o.messages, limit_s=600))
        self.say(f"    {ceiling:,.0f} msgs/s")
        self.say("2/7 bare faust agent that only counts (faust as installed, then with the worker's faust tuning)")
        bare_clock = self._bare(bootstrap, o.messages, "stock")
        bare_tuned_clock = self._bare(bootstrap, o.messages, "tuned")
        bare, bare_tuned = bare_clock.rate(), bare_tuned_clock.rate()
        self.say(f"    {bare:,.0f} msgs/s; {bare_tuned:,.0f} msgs/s tuned")
        self.say("3/7 the same job in Quix Streams (decode, 1 min and 1 h windows with changelogs, raw rows to chdb)")
        quix = self._quix(bootstrap, o.messages, o.batched_messages * o.batch_size)
        aggregates = self._scylla_where
        self.say("4/7 full pipeline, single-reading messages, " + _aggregates_to(aggregates))
        pipeline_clock, pipeline_text, pipeline_rss = self._pipeline(
            "pipeline", "bench-single", o.messages, scylla_settings(aggregates, "millstream_bench_pipeline")
        )
        pipeline = self.rate_hint = pipeline_clock.rate()
        self.say(f"    {pipeline:,.0f} msgs/s")
        self.say(f"5/7 full pipeline, {o.batch_size} readings per message")
        batched_clock, batched_text, batched_rss = self._pipeline(
            "batched", "bench-batched", o.batched_messages, scylla_settings(aggregates, "millstream_bench_batched")
        )
        batched_rate = batched_clock.rate() * o.batch_size
        self.say(f"    {batched_rate:,.0f} readings/s")
        live_rate = max(50.0, pipeline / 2) if not math.isnan(pipeline) else 1000.0
        self.say(f"6/7 latency at {live_rate:,.0f} msgs/s for {o.latency_seconds:.0f}s (half the pipeline rate)")
        latency_text, latency_rss = self._latency(live_rate, scylla_settings(aggregates, "millstream_bench_live"))
        sweep = self._sweep()

        inserts = sum(
            metric_value(text, "millstream_sink_batch_rows_count", 'sink="clickhouse"')
            for text in (pipeline_text, batched_text, latency_text)
        )
        rows = sum(
            metric_value(text, "millstream_sink_batch_rows_sum", 'sink="clickhouse"')
            for text in (pipeline_text, batched_text, latency_text)
        )
        half = [mb for done, mb in pipeline_clock.rss if done >= o.messages / 2]
        return {
            "broker": "tansu (bundled, memory storage), same process for every phase",
            "clickhouse": "embedded (chdb)" if o.clickhouse_url is None else o.clickhouse_url,
            "scylla": _aggregates_to(aggregates) + " in every worker phase (4-7)",
            "producer_settings": "production: " + ", ".join(f"{k}={v}" for k, v in PRODUCER_OPTIONS.items()),
            "worker_settings": "defaults (producer batches of 16384 bytes: recovery is not exercised); latency "
            f"phase: MILLSTREAM_KAFKA__FETCH_MAX_WAIT_MS={LATENCY_FETCH_WAIT_MS}",
            "messages": o.messages,
            "batched_messages": o.batched_messages,
            "readings_per_batched_message": o.batch_size,
            "batched_readings": batched_readings,
            "produce_msgs_per_s": round(produce_rate),
            "consume_ceiling_msgs_per_s": round(ceiling),
            "bare_agent_msgs_per_s": round(bare),
            "pipeline_msgs_per_s": round(pipeline),
            "pipeline_vs_bare_ratio": round(pipeline / bare, 3),
            "bare_tuned_msgs_per_s": round(bare_tuned),
            "pipeline_vs_bare_tuned_ratio": round(pipeline / bare_tuned, 3),
            "pipeline_vs_ceiling_ratio": round(pipeline / ceiling, 3),
            # CPU of each consumer process (all threads) per message, ready to done: steadier
            # than wall-clock rates on a shared machine. The ratio: bare CPU / pipeline CPU.
            "bare_agent_process_cpu_us_per_msg": round(bare_clock.cpu_us_per_message(), 1),
            "bare_tuned_process_cpu_us_per_msg": round(bare_tuned_clock.cpu_us_per_message(), 1),
            "pipeline_process_cpu_us_per_msg": round(pipeline_clock.cpu_us_per_message(), 1),
            "pipeline_vs_bare_cpu_ratio": round(
                bare_clock.cpu_us_per_message() / pipeline_clock.cpu_us_per_message(), 3
            ),
            "batched_process_cpu_us_per_reading": round(batched_clock.cpu_us_per_message() / o.batch_size, 2),
            "batched_readings_per_s": round(batched_rate),
            # aggregate rows upserted to ScyllaDB per message (0: no ScyllaDB to write to)
            "pipeline_aggregate_rows_per_msg": round(scylla_rows(pipeline_text) / o.messages, 3),
            "batched_aggregate_rows_per_msg": round(scylla_rows(batched_text) / o.batched_messages, 3),
            "pipeline_cpu_msgs_per_s": round(cpu_msgs),
            "pipeline_cpu_readings_per_s": round(cpu_readings),
            "latency_rate_msgs_per_s": round(live_rate),
            "latency_p50_s": round(histogram_quantile(latency_text, "millstream_ack_latency_seconds", 0.5), 3),
            "latency_p99_s": round(histogram_quantile(latency_text, "millstream_ack_latency_seconds", 0.99), 3),
            "rows_per_insert": round(rows / inserts) if inserts else 0,
            "rss_peak_mb": round(max(pipeline_rss + batched_rss + latency_rss), 1),
            # each worker's own peak, for sizing by message shape (README, Performance)
            "pipeline_rss_peak_mb": round(max(pipeline_rss, default=0.0), 1),
            "batched_rss_peak_mb": round(max(batched_rss, default=0.0), 1),
            "rss_growth_ratio": round(half[-1] / half[0], 3) if len(half) >= 2 else 1.0,
            **self._versus_quix(quix, pipeline, pipeline_clock, batched_rate),
            **sweep,
        }

    def _quix(self, bootstrap: str, messages: int, batched_readings: int) -> dict[str, Any]:
        """Quix Streams on the single-reading and the batched topic, each in a process of its
        own (app/tools/bench_quix.py); {} with a note when it is not installed."""
        import importlib.util

        if importlib.util.find_spec("quixstreams") is None:  # looked up, not imported: the job runs apart
            self.say("    skipped: Quix Streams is not installed (pip install -e '.[bench]')")
            return {}
        o = self.options
        runs: dict[str, Any] = {}
        for name, topic, total in (("single", "bench-single", messages), ("batched", "bench-batched",
                                                                           o.batched_messages)):  # fmt: skip
            workdir = self.workdir / f"quix-{name}"
            workdir.mkdir(exist_ok=True)
            with open(self.workdir / "quix.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "app.tools.bench_quix", bootstrap, topic, f"bench-quix-{name}",
                     str(workdir), str(total)], stdout=subprocess.PIPE, stderr=log,
                )  # fmt: skip
            self.children.append(lambda proc=proc: stop_process(proc, 30))  # type: ignore[misc]
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"the Quix Streams job exited with {proc.returncode}; see {self.workdir}/quix.log")
            runs[name] = json.loads(out.decode().strip().splitlines()[-1])
        single, batched = runs["single"], runs["batched"]
        result = {
            "quix_msgs_per_s": round(single["messages"] / single["seconds"]),
            "quix_process_cpu_us_per_msg": round(single["cpu_s"] / single["messages"] * 1e6, 1),
            "quix_readings_per_s": round(batched_readings / batched["seconds"]),
            "quix_batched_process_cpu_us_per_reading": round(batched["cpu_s"] / batched_readings * 1e6, 2),
        }
        self.say(f"    {result['quix_msgs_per_s']:,} msgs/s; {result['quix_readings_per_s']:,} readings/s batched")
        return result

    @staticmethod
    def _versus_quix(
        quix: dict[str, Any], pipeline: float, pipeline_clock: RateClock, batched: float
    ) -> dict[str, Any]:
        if not quix:
            return {"quix": "skipped: Quix Streams not installed (pip install -e '.[bench]')"}
        return {
            **quix,
            "pipeline_vs_quix_ratio": round(pipeline / quix["quix_msgs_per_s"], 3),
            "pipeline_vs_quix_cpu_ratio": round(
                quix["quix_process_cpu_us_per_msg"] / pipeline_clock.cpu_us_per_message(), 3
            ),
            "batched_vs_quix_ratio": round(batched / quix["quix_readings_per_s"], 3),
        }

    def _bare(self, bootstrap: str, total: int, shape: str) -> RateClock:
        import urllib.request

        port = free_port()
        with open(self.workdir / "bare.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.tools.bench_bare", bootstrap, "bench-single", f"bench-bare-{shape}",
                 str(port), str(self.workdir / f"bare-{shape}"), shape],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.children.append(lambda: stop_process(proc, 30))

        def state() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as response:
                return dict(json.loads(response.read()))

        def alive() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"the bare agent exited with {proc.returncode}; see {self.workdir}/bare.log")

        clock = RateClock(total=total)
        try:
            clock.ready = _wait_ready(lambda: bool(state()["ready"]), alive, 300)
            clock.cpu_ready = cpu_seconds(proc.pid)
            deadline = time.monotonic() + 600
            while (count := state()["count"]) < total:
                alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bare agent stopped at {count}/{total}; see bare.log")
                time.sleep(BARE_POLL_S)
            clock.done = time.monotonic()
            clock.cpu_done = cpu_seconds(proc.pid)
        finally:
            stop_process(proc, 30)
        return clock

    def _worker(self, phase: str, topic: str, **settings: str) -> LocalWorker:
        worker = LocalWorker(
            name=f"bench-{phase}", workdir=self.workdir, bootstrap=self.broker.bootstrap, topic=topic,
            clickhouse_url=self._clickhouse_url(phase),
            settings={"KAFKA__PARTITIONS": str(self.options.partitions), **settings},
        )  # fmt: skip
        self.children.append(worker.stop)
        worker.start()
        return worker

    def _pipeline(
        self, phase: str, topic: str, total: int, settings: dict[str, str], query_devices: list[str] | None = None
    ) -> tuple[RateClock, str, list[float]]:
        """A worker from ready to every message acked; with ``query_devices``, clients query
        ``millstream api`` about them meanwhile (ApiLoad)."""
        worker = self._worker(phase, topic, **settings)
        clock = RateClock(total=total)

        def on_poll(now: float, acked: float, text: str) -> None:
            clock.rss.append((acked, rss_mb(worker.pid)))
            batch_cpu = metric_value(text, "millstream_batch_cpu_seconds_sum")
            clock.samples.append((now, acked, batch_cpu))

        client = ApiLoad(self._api(phase, worker), query_devices) if query_devices else None
        try:
            clock.ready = _wait_ready(lambda: worker.get("/readyz")[0] == 200, worker.check_alive, 300)
            clock.cpu_ready = cpu_seconds(worker.pid)
            if client is not None:
                client.api.start()  # the worker made the keyspace; the API reads what it writes
                client.api.wait_ready(60)
                client.start()
            text = worker.wait_acked(total, timeout=900, progress=self.say, on_poll=on_poll, interval=POLL_S)
            clock.done = time.monotonic()
            clock.cpu_done = cpu_seconds(worker.pid)
            if client is not None:
                client.stop()
                clock.query_cpu_us = query_cost(client.api, client.devices)
        finally:
            if client is not None:
                client.stop()
                client.api.stop()
            worker.stop()
        clock.api = client
        return clock, text, [mb for _done, mb in clock.rss]

    def _api(self, phase: str, worker: LocalWorker) -> WorkerChild:
        """``millstream api`` over the worker's ScyllaDB, as deploy/ runs it beside the workers
        (components/lookup-api); started once the worker is ready."""
        port = free_port()
        settings = {**worker.settings, "MILLSTREAM_API__WEB_PORT": str(port)}
        api = WorkerChild(name=f"{phase}-api", log_path=self.workdir / f"{phase}-api.log", web_port=port,
                          settings=settings, command="api")  # fmt: skip
        self.children.append(api.stop)
        return api

    def _latency(self, rate: float, settings: dict[str, str]) -> tuple[str, list[float]]:
        o = self.options
        # tansu holds a fetch until its max wait even when records arrive (Kafka answers at
        # once), so a short wait keeps the broker's habit out of millstream's latency.
        worker = self._worker("latency", "bench-live", KAFKA__FETCH_MAX_WAIT_MS=str(LATENCY_FETCH_WAIT_MS), **settings)
        try:
            worker.wait_ready()
            time.sleep(2)  # let the group settle and the first fetches start
            count = max(1, int(rate * o.latency_seconds))
            messages = _messages(o, batched=False, count=count, seed=3)
            samples: list[float] = []
            asyncio.run(_produce(self.broker.bootstrap, "bench-live", messages, rate))
            text = worker.wait_acked(
                count, timeout=300, progress=self.say, on_poll=lambda _n, _a, _t: samples.append(rss_mb(worker.pid)),
                interval=POLL_S,
            )  # fmt: skip
            samples.append(rss_mb(worker.pid))
        finally:
            worker.stop()
        return text, samples

    @functools.cached_property
    def _scylla_where(self) -> tuple[str, int] | None:
        """Where every worker phase writes aggregates, looked for (and a test server started)
        once per bench."""
        return self._scylla_hosts()

    def _scylla_hosts(self) -> tuple[str, int] | None:
        """Where the worker phases write aggregates: ``--scylla``, else a CQL test server started from
        the checkout (tests/support/cql); None when neither is there."""
        if self.options.scylla:
            hosts = [h.strip() for h in self.options.scylla.split(",") if h.strip()]
            ports = {int(h.rsplit(":", 1)[1]) for h in hosts if ":" in h} or {9042}
            if len(ports) > 1:
                raise RuntimeError("--scylla: every host must use the same port")
            return ",".join(h.rsplit(":", 1)[0] for h in hosts), ports.pop()
        root = Path(__file__).resolve().parents[2]
        if not (root / "tests" / "support" / "cql" / "server.py").exists():
            return None
        port = free_port()
        with open(self.workdir / "cql-server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.cql.server", "--port", str(port)], cwd=root, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.children.append(lambda: stop_process(proc, 10))
        deadline = time.monotonic() + 30
        while "CQL test server on" not in (self.workdir / "cql-server.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CQL test server did not start; see {self.workdir}/cql-server.log")
            time.sleep(0.1)
        return "127.0.0.1", port

    def _sweep(self) -> dict[str, Any]:
        """Phase 6: the same pipeline with ScyllaDB on, from few devices to many."""
        o = self.options
        points = sorted(set(o.sweep_devices))
        if not points:
            return {}
        where = self._scylla_where
        if where is None:
            self.say("7/7 device sweep skipped: no --scylla HOSTS and no CQL test server (tests/ of a checkout)")
            return {"device_sweep": "skipped: needs --scylla HOSTS or a checkout with tests/support/cql"}
        hosts, port = where
        scaling = max((d for d in points if d <= SCALING_DEVICES), default=points[0])
        runs = [(devices, True) for devices in points] + [(scaling, False)]
        self.say(f"7/7 device sweep, ScyllaDB at {hosts}:{port}: {', '.join(f'{d:,}' for d in points)} devices, "
                 f"then {scaling:,} without ScyllaDB")  # fmt: skip
        rows = [self._sweep_point(devices, (hosts, port) if scylla else None) for devices, scylla in runs]
        # One worker ingests while the client queries and pauses in turn; the phases compare
        # within one run (two runs of one point differ by more than the queries cost).
        seconds = API_WARMUP_S + o.api_seconds
        # sized from the best rate seen: a short sweep point's rate is mostly its start
        rate = max(rows[0]["msgs_per_s"], self.rate_hint if math.isfinite(self.rate_hint) else 0.0)
        messages = max(int(rate * seconds), o.sweep_messages, points[0])
        self.say(f"    {points[0]:,} devices again, {messages:,} messages (about {seconds:g}s): {API_QUERIES_PER_S:g} "
                 f"lookup API queries/s, on and off every {API_PHASE_S:g}s or so")  # fmt: skip
        queried = self._sweep_point(points[0], (hosts, port), queried=messages)
        on = {r["devices"]: r for r in rows if r["scylla"]}
        off = next(r for r in rows if not r["scylla"])
        low, high = on[points[0]], on[points[-1]]
        grown_bytes = (high["rss_peak_mb"] - low["rss_peak_mb"]) * 1024 * 1024
        per_device = grown_bytes / max(high["devices_with_messages"] - low["devices_with_messages"], 1)
        rows_at_scaling = on[scaling]["aggregate_rows_per_msg"]
        return {
            "device_sweep": rows,
            "device_scaling_ratio": round(on[scaling]["msgs_per_s"] / low["msgs_per_s"], 3),
            "device_scaling_cpu_ratio": round(low["cpu_us_per_msg"] / on[scaling]["cpu_us_per_msg"], 3),
            "device_scaling_points": f"{scaling} / {points[0]} devices",
            # ScyllaDB's share of the worker's CPU at the scaling point, per aggregate row upserted
            "scylla_cpu_us_per_row": round(
                (on[scaling]["cpu_us_per_msg"] - off["cpu_us_per_msg"]) / rows_at_scaling, 1
            ) if rows_at_scaling else 0.0,
            "memory_per_device_bytes": round(per_device),
            # One worker's ingestion while millstream api answers lookups beside it, against
            # without them (issue 15).
            "api_query_point": queried,
            "api_load_ratio": _ratio(queried["msgs_per_s_with_queries"], queried["msgs_per_s_without"]),
            "api_load_cpu_ratio": _ratio(queried["cpu_us_per_msg_without"], queried["cpu_us_per_msg_with_queries"]),
            # What the queries cost millstream api (its CPU per query, measured alone after the
            # run), as a share of the worker's ingestion CPU without queries: what API pods
            # take beside the workers at API_QUERIES_PER_S queries a second.
            "api_cpu_us_per_query": queried["api_cpu_us_per_query"],
            "api_cpu_share": _ratio(
                queried["api_cpu_us_per_query"] * API_QUERIES_PER_S,
                queried["cpu_us_per_msg_without"] * queried["msgs_per_s_without"],
            ),
        }  # fmt: skip

    def _sweep_point(self, devices: int, scylla: tuple[str, int] | None, queried: int = 0) -> dict[str, Any]:
        """One worker reading single-reading messages of ``devices`` devices, with ScyllaDB at
        ``scylla`` (hosts, port) or without it; ``queried``: that many messages, under lookup API
        queries half of the time (ApiLoad)."""
        o = self.options
        count = queried or max(o.sweep_messages, devices)
        name = f"sweep-{devices}" + ("" if scylla is not None else "-noscylla") + ("-api" if queried else "")
        topic = f"bench-{name}"
        asyncio.run(create_topics([topic], partitions=o.partitions, bootstrap_servers=self.broker.bootstrap))
        messages = _messages(BenchOptions(devices=devices, batch_size=1), batched=False, count=count, seed=4 + devices)
        asyncio.run(_produce(self.broker.bootstrap, topic, messages, None))
        keys = sorted({key for key, _ in messages})
        touched, sample = len(keys), [key.decode() for key in keys[:: max(1, len(keys) // 200)]]
        del messages
        settings = scylla_settings(scylla, f"millstream_bench_{devices}" + ("_api" if queried else ""))
        clock, text, rss = self._pipeline(name, topic, count, settings, sample if queried else None)
        row = {
            "devices": devices,
            "scylla": scylla is not None,
            **(api_figures(clock) if clock.api is not None else {}),
            "messages": count,
            "devices_with_messages": touched,
            "msgs_per_s": round(clock.rate()),
            "cpu_us_per_msg": round(clock.cpu_us_per_message(), 1),
            "aggregate_rows_per_msg": round(scylla_rows(text) / count, 2),
            "scylla_requests_per_msg": round(metric_value(text, "millstream_scylla_write_requests_total") / count, 3),
            "changelog_records_per_msg": round(changelog_records(text) / count, 2),
            "rss_peak_mb": round(max(rss, default=0.0), 1),
        }
        if queried:
            self.say(api_summary(row))
        without = "" if scylla is not None else ", no ScyllaDB"
        self.say(f"    {devices:,} devices{without}: {row['msgs_per_s']:,} msgs/s, "
                 f"{row['cpu_us_per_msg']} µs CPU/msg, {row['aggregate_rows_per_msg']} rows and "
                 f"{row['scylla_requests_per_msg']} requests per msg, {row['rss_peak_mb']} MiB")  # fmt: skip
        return row

    def close(self) -> None:
        for stop in self.children:
            stop()
        self.broker.stop()


API_PATHS = ("/latest", "/windows?metric=temperature&limit=100")  # the queries' mix
API_COST_QUERIES = 300  # queries timed on millstream api once the worker is done
# The query-load point's clients query for about this long, then pause, and so on: several
# batches each (a batch's messages are acked at once, so short phases measure batch boundaries).
API_PHASE_S = 4.0
API_CLIENTS = 4  # lookup API clients at once in the query-load point
API_WARMUP_S = 3.0  # its first seconds, without queries, count for neither side (the worker warms up)


class ApiLoad:
    """Lookup API clients in threads of the bench, API_CLIENTS of them, asking ``api`` (millstream
    api beside the worker, as deploy/ runs it), each over a connection it keeps and on a schedule
    of its own, together API_QUERIES_PER_S queries a second about
    ``devices`` in one phase, none in the next, and so on: one worker's ingestion is compared
    with and without queries (:func:`phase_split`), without the differences between two
    workers' runs. The phases come in blocks of on, off, off, on (:func:`phase_switches`), so
    that a drift over the run (the worker's CPU per message grows as its state and stores do)
    falls on both sides alike. Several clients, as an API has: one waits for each answer."""

    def __init__(self, api: WorkerChild, devices: list[str]) -> None:
        self.api, self.devices = api, devices
        self.switches: list[float] = []  # when queries go on, off, on, ... (from start())
        self.answered = self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True, name=f"bench-api-client-{n}")
            for n in range(API_CLIENTS)
        ]

    def start(self) -> None:
        self.switches = phase_switches(time.monotonic() + API_WARMUP_S, 3600, random.Random(7))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)

    def switched(self, until: float) -> list[float]:
        """The switches up to ``until``."""
        return self.switches[: max(bisect.bisect_right(self.switches, until), 1)]

    def _run(self, n: int) -> None:
        rng, api, every = random.Random(5 + n), self.api.client(), API_CLIENTS / API_QUERIES_PER_S
        offset = every * n / API_CLIENTS  # the clients' schedules interleave
        due = self.switches[0] + offset
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                phase = bisect.bisect_right(self.switches, now)  # 0: before the first; odd: queries on
                if phase % 2 == 0:  # queries off until the next switch
                    due = self.switches[min(phase, len(self.switches) - 1)] + offset
                    self._stop.wait(max(due - offset - now, 0.0))
                elif now >= due:
                    status, _ = api.get(f"/devices/{rng.choice(self.devices)}{rng.choice(API_PATHS)}")
                    with self._lock:
                        if status in (200, 404):  # 404: a device whose first batch is not written yet
                            self.answered += 1
                        else:
                            self.errors += 1
                    due += every  # a schedule: slow answers do not lower the rate
                else:
                    self._stop.wait(due - now)
        finally:
            api.close()


def scylla_settings(where: tuple[str, int] | None, keyspace: str) -> dict[str, str]:
    """A worker's settings to write aggregates to ScyllaDB at ``where`` (hosts, port) in
    ``keyspace``, one per topic (write versions are per topic: docs/migrations.md); without
    ScyllaDB when ``where`` is None."""
    if where is None:
        return {"SCYLLA__ENABLED": "false"}
    hosts, port = where
    return {
        "SCYLLA__ENABLED": "true", "SCYLLA__CONTACT_POINTS": hosts, "SCYLLA__PORT": str(port),
        "SCYLLA__KEYSPACE": keyspace, "SCYLLA__REPLICATION_CLASS": "SimpleStrategy",
        "SCYLLA__REPLICATION_FACTOR": "1", "SCYLLA__CONSISTENCY": "ONE",
    }  # fmt: skip


def _aggregates_to(where: tuple[str, int] | None) -> str:
    if where is None:
        return "aggregates kept in the worker's tables (no --scylla HOSTS and no CQL test server)"
    return f"aggregates to ScyllaDB at {where[0]}:{where[1]}"


def phase_switches(start: float, seconds: float, rng: random.Random) -> list[float]:
    """When queries go on, off, on, ... from ``start`` for at least ``seconds``: blocks of on,
    off, off, on, each quarter of a block as long as the others (half of API_PHASE_S, drawn at
    random from half to one and a half times that, so the worker's periodic work cannot line up
    with them). The two sides' times have the same centre in every block: a linear drift cancels
    out. Two blocks' neighbouring quarters of the same side make one phase."""
    switches, at = [start, start], start  # on at start; the first block's "on" ends at the second
    while at < start + seconds:
        quarter = API_PHASE_S / 2 * rng.uniform(0.5, 1.5)
        switches[-1] += quarter  # on: this block's first quarter (after the last block's final one)
        switches.append(switches[-1] + 2 * quarter)  # off, off
        at = switches[-1] + quarter
        switches.append(at)  # on until here, or on through the next block's first quarter
    return switches


def api_figures(clock: RateClock) -> dict[str, Any]:
    """The query-load point's figures: the client's, the phases', millstream api's per query."""
    assert clock.api is not None
    api = clock.api
    switches = api.switched(clock.done)
    split = phase_split(clock.samples, switches)
    querying_s = sum(
        max(min(end, clock.done) - start, 0.0) for start, end in zip(switches[::2], api.switches[1::2], strict=False)
    )  # fmt: skip
    return {
        "api_queries_answered": api.answered,
        "api_queries_per_s": round(api.answered / querying_s, 1) if querying_s else 0.0,
        "api_query_errors": api.errors,
        "api_phases": len(switches),
        **{key: _rounded(value, 0 if key.startswith(("msgs", "batched")) else 1) for key, value in split.items()},
        "api_cpu_us_per_query": round(clock.query_cpu_us),
    }


def api_summary(row: dict[str, Any]) -> str:
    def shown(key: str) -> str:
        value = row[key]
        return "none (no such phase was complete)" if value is None else f"{value:,}"

    return (f"    with queries {shown('msgs_per_s_with_queries')} msgs/s, {shown('cpu_us_per_msg_with_queries')} µs "
            f"CPU/msg ({row['api_queries_per_s']} queries/s); without {shown('msgs_per_s_without')} msgs/s, "
            f"{shown('cpu_us_per_msg_without')} µs CPU/msg; {row['api_phases']} phases; "
            f"{row['api_cpu_us_per_query']} µs CPU per query in millstream api")  # fmt: skip


def _rounded(value: float, digits: int) -> float | None:
    """None for a figure a run did not yield (a phase it never reached): JSON has no NaN."""
    if not math.isfinite(value):
        return None
    return round(value) if digits == 0 else round(value, digits)


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 3) if top is not None and bottom else None


def phase_split(samples: list[tuple[float, float, float]], switches: list[float]) -> dict[str, float]:
    """Rate and CPU per message with and without queries, from the scrapes' ``samples`` (time,
    messages acked, the sum of the worker's millstream_batch_cpu_seconds) and the
    client's ``switches`` (times queries went on, off, on, ...).

    An interval between two scrapes counts for the phase it lies in; one across a switch,
    before the first or after the last (the run's end: the backlog's tail, not a phase), for
    neither. The rate is messages acked over the phases' seconds. The CPU per message counts
    whole batches: the worker acks a batch at a time (5,000 messages, about half a second), so
    the messages acked between two scrapes come in steps while the CPU flows on, and a phase of
    a few seconds held one batch more or less than its share (a null run, clients sending
    nothing, read 0.80 to 1.11). A batch counts when both its ack and the one before it (where
    its CPU starts) were seen in the same phase, with the CPU the worker measured between them.
    """
    sums = {True: [0.0] * 4, False: [0.0] * 4}  # seconds, messages, batch messages, batch CPU s
    acked_in = None  # the phase of the last ack seen, while the intervals since stay in it
    for (t0, done0, batch0), (t1, done1, batch1) in itertools.pairwise(samples):
        phase = bisect.bisect_right(switches, t0)
        if phase in (0, len(switches)) or phase != bisect.bisect_right(switches, t1):
            acked_in = None
            continue
        total = sums[phase % 2 == 1]
        total[0], total[1] = total[0] + t1 - t0, total[1] + done1 - done0
        if done1 > done0:
            if acked_in == phase:
                total[2], total[3] = total[2] + done1 - done0, total[3] + batch1 - batch0
            acked_in = phase
    (on_s, on_msgs, on_batched, on_cpu), (off_s, off_msgs, off_batched, off_cpu) = sums[True], sums[False]
    return {
        "msgs_per_s_with_queries": on_msgs / on_s if on_s else math.nan,
        "msgs_per_s_without": off_msgs / off_s if off_s else math.nan,
        "cpu_us_per_msg_with_queries": on_cpu / on_batched * 1e6 if on_batched else math.nan,
        "cpu_us_per_msg_without": off_cpu / off_batched * 1e6 if off_batched else math.nan,
        "seconds_with_queries": on_s,
        "seconds_without": off_s,
        "batched_messages_with_queries": on_batched,
        "batched_messages_without": off_batched,
    }


def query_cost(worker: WorkerChild, devices: list[str]) -> float:
    """µs of a process's CPU per lookup API query (the mix of API_PATHS) once it has nothing
    else to do: its CPU over the queries, less what it spends idle over the same time."""
    time.sleep(1.0)  # the last commits and writes settle
    started, idle_from = time.monotonic(), cpu_seconds(worker.pid)
    time.sleep(2.0)
    idle_per_s = (cpu_seconds(worker.pid) - idle_from) / (time.monotonic() - started)
    rng, api = random.Random(6), worker.client()
    started, busy_from = time.monotonic(), cpu_seconds(worker.pid)
    try:
        for _ in range(API_COST_QUERIES):
            api.get(f"/devices/{rng.choice(devices)}{rng.choice(API_PATHS)}")
    finally:
        api.close()
    busy = cpu_seconds(worker.pid) - busy_from - idle_per_s * (time.monotonic() - started)
    return max(busy, 0.0) / API_COST_QUERIES * 1e6


def scylla_rows(text: str) -> float:
    """Aggregate rows a worker upserted to ScyllaDB, from its /metrics ``text``."""
    return metric_value(text, "millstream_sink_batch_rows_sum", 'sink="scylla"')


def changelog_records(text: str) -> float:
    """Records the worker sent to its tables' changelog topics (faust's sensor, one scrape)."""
    pattern = r'^faust_topic_messages_sent_total\{topic="topic\.[^"]*-changelog"\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def goal_met(key: str, value: float) -> str:
    if key not in GOALS:
        return ""
    op, goal = GOALS[key]
    met = value >= goal if op == ">=" else value <= goal
    return f"{op} {goal:g}: {'met' if met else 'not met'}"


SWEEP_COLUMNS = (
    ("devices", "devices"), ("scylla", "ScyllaDB"), ("messages", "messages"), ("msgs_per_s", "msgs/s"),
    ("cpu_us_per_msg", "CPU µs/msg"), ("aggregate_rows_per_msg", "aggregate rows/msg"),
    ("scylla_requests_per_msg", "Scylla requests/msg"), ("changelog_records_per_msg", "changelog records/msg"),
    ("rss_peak_mb", "peak RSS MiB"),
)  # fmt: skip


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The device sweep as a Markdown table (docs/performance.md quotes it as printed)."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(title for _, title in SWEEP_COLUMNS) + " |"]
    lines.append("|" + "---|" * len(SWEEP_COLUMNS))
    lines += ["| " + " | ".join(cell(row[key]) for key, _ in SWEEP_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def run_bench(options: BenchOptions, as_json: bool) -> int:
    def say(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="millstream-bench-"))
    bench = Bench(options, workdir, say)
    try:
        result = bench.run()
    except KeyboardInterrupt:
        say("interrupted; stopping what the bench started")
        return 130
    except Exception as exc:
        print(f"millstream: bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    sweep = result.get("device_sweep")
    width = max(len(k) for k in result)
    print()
    for key, value in result.items():
        if (key == "device_sweep" and isinstance(sweep, list)) or isinstance(value, dict):
            continue
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:<{width}}  {shown:<24} {goal_met(key, value) if isinstance(value, (int, float)) else ''}")
    if isinstance(sweep, list):
        print("\ndevice sweep (single-reading messages, one worker)")
        print(sweep_table(sweep))
    if isinstance(result.get("api_query_point"), dict):
        print(f"\nlookup API point ({result['api_query_point']['devices']:,} devices, one worker):")
        print(api_summary(result["api_query_point"]).strip())
    print(f"\nworker logs in {workdir}")
    if as_json:
        print(json.dumps(result))
    return 0
