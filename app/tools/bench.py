"""``millstream bench``: millstream against its limits, in one run on one broker and machine.

Phases, each on data produced once before any is timed:

1. ceiling   - a plain aiokafka consumer reads the single-reading topic (one process's limit);
2. bare      - a faust agent that only counts reads the same topic (the framework floor),
               once with faust as installed and once with the faust tuning the worker
               applies (app/faust_patches.py, cython_optimizations, a larger stream buffer);
3. pipeline  - ``millstream worker`` (decode, validate, windows, sinks, commit after write)
               reads the same topic;
4. batched   - a worker reads messages of ``--batch-size`` readings each;
5. latency   - a worker reads a topic fed live at half the pipeline's rate; the producer's
               record timestamp to the ack after both writes, from the worker's histogram.

Rates are timed from the first scrape that sees progress to the scrape that sees the last
message, so start-up (group join, table recovery, sink DDL) is not counted for anyone.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.tools.broker import EmbeddedBroker, create_topics, free_port, stop_process
from app.tools.local import LocalWorker, cpu_seconds, histogram_quantile, metric_value, rss_mb
from app.tools.simulator import Simulator, send_paced

POLL_S = 0.25  # worker /metrics scrapes: each costs the worker a little CPU
BARE_POLL_S = 0.1  # the bare agents' /count costs nothing: finer timing for the shorter runs
LATENCY_FETCH_WAIT_MS = 50
PRODUCER_OPTIONS: dict[str, Any] = {"linger_ms": 10, "max_batch_size": 1_048_576, "acks": "all"}
GOALS: dict[str, tuple[str, float]] = {
    # key: (comparison, goal) from DESIGN.md
    "pipeline_vs_bare_ratio": (">=", 0.8),
    "batched_readings_per_s": (">=", 200_000),
    "latency_p99_s": ("<=", 1.5),
    "rows_per_insert": (">=", 10_000),
    "rss_growth_ratio": ("<=", 1.1),
}


@dataclass
class BenchOptions:
    messages: int = 100_000
    batched_messages: int = 4_000
    batch_size: int = 50
    devices: int = 200
    partitions: int = 4
    latency_seconds: float = 15.0
    clickhouse_url: str | None = None  # default: embedded ClickHouse (chdb), one store per phase


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
        asyncio.run(create_topics(topics, partitions=o.partitions, bootstrap_servers=bootstrap))
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

        self.say("1/5 ceiling: plain aiokafka consumer")
        ceiling = asyncio.run(_consume_ceiling(bootstrap, "bench-single", o.messages, limit_s=600))
        self.say(f"    {ceiling:,.0f} msgs/s")
        self.say("2/5 bare faust agent that only counts (faust as installed, then with the worker's faust tuning)")
        bare_clock = self._bare(bootstrap, o.messages, "stock")
        bare_tuned_clock = self._bare(bootstrap, o.messages, "tuned")
        bare, bare_tuned = bare_clock.rate(), bare_tuned_clock.rate()
        self.say(f"    {bare:,.0f} msgs/s; {bare_tuned:,.0f} msgs/s tuned")
        self.say("3/5 full pipeline, single-reading messages")
        pipeline_clock, pipeline_text, pipeline_rss = self._pipeline("pipeline", "bench-single", o.messages)
        pipeline = pipeline_clock.rate()
        self.say(f"    {pipeline:,.0f} msgs/s")
        self.say(f"4/5 full pipeline, {o.batch_size} readings per message")
        batched_clock, batched_text, batched_rss = self._pipeline("batched", "bench-batched", o.batched_messages)
        batched_rate = batched_clock.rate() * o.batch_size
        self.say(f"    {batched_rate:,.0f} readings/s")
        live_rate = max(50.0, pipeline / 2) if not math.isnan(pipeline) else 1000.0
        self.say(f"5/5 latency at {live_rate:,.0f} msgs/s for {o.latency_seconds:.0f}s (half the pipeline rate)")
        latency_text, latency_rss = self._latency(live_rate)

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
            "scylla": "disabled (aggregates kept in the worker tables)",
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
            "pipeline_cpu_msgs_per_s": round(cpu_msgs),
            "pipeline_cpu_readings_per_s": round(cpu_readings),
            "latency_rate_msgs_per_s": round(live_rate),
            "latency_p50_s": round(histogram_quantile(latency_text, "millstream_ack_latency_seconds", 0.5), 3),
            "latency_p99_s": round(histogram_quantile(latency_text, "millstream_ack_latency_seconds", 0.99), 3),
            "rows_per_insert": round(rows / inserts) if inserts else 0,
            "rss_peak_mb": round(max(pipeline_rss + batched_rss + latency_rss), 1),
            "rss_growth_ratio": round(half[-1] / half[0], 3) if len(half) >= 2 else 1.0,
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

    def _pipeline(self, phase: str, topic: str, total: int) -> tuple[RateClock, str, list[float]]:
        worker = self._worker(phase, topic)
        clock = RateClock(total=total)

        def on_poll(now: float, acked: float) -> None:
            clock.rss.append((acked, rss_mb(worker.pid)))

        try:
            clock.ready = _wait_ready(lambda: worker.get("/readyz")[0] == 200, worker.check_alive, 300)
            clock.cpu_ready = cpu_seconds(worker.pid)
            text = worker.wait_acked(total, timeout=900, progress=self.say, on_poll=on_poll, interval=POLL_S)
            clock.done = time.monotonic()
            clock.cpu_done = cpu_seconds(worker.pid)
        finally:
            worker.stop()
        return clock, text, [mb for _done, mb in clock.rss]

    def _latency(self, rate: float) -> tuple[str, list[float]]:
        o = self.options
        # tansu holds a fetch until its max wait even when records arrive (Kafka answers at
        # once), so a short wait keeps the broker's habit out of millstream's latency.
        worker = self._worker("latency", "bench-live", KAFKA__FETCH_MAX_WAIT_MS=str(LATENCY_FETCH_WAIT_MS))
        try:
            worker.wait_ready()
            time.sleep(2)  # let the group settle and the first fetches start
            count = max(1, int(rate * o.latency_seconds))
            messages = _messages(o, batched=False, count=count, seed=3)
            samples: list[float] = []
            asyncio.run(_produce(self.broker.bootstrap, "bench-live", messages, rate))
            text = worker.wait_acked(
                count, timeout=300, progress=self.say, on_poll=lambda _n, _a: samples.append(rss_mb(worker.pid)),
                interval=POLL_S,
            )  # fmt: skip
            samples.append(rss_mb(worker.pid))
        finally:
            worker.stop()
        return text, samples

    def close(self) -> None:
        for stop in self.children:
            stop()
        self.broker.stop()


def goal_met(key: str, value: float) -> str:
    if key not in GOALS:
        return ""
    op, goal = GOALS[key]
    met = value >= goal if op == ">=" else value <= goal
    return f"{op} {goal:g}: {'met' if met else 'not met'}"


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
    width = max(len(k) for k in result)
    print()
    for key, value in result.items():
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:<{width}}  {shown:<24} {goal_met(key, value) if isinstance(value, (int, float)) else ''}")
    print(f"\nworker logs in {workdir}")
    if as_json:
        print(json.dumps(result))
    return 0
