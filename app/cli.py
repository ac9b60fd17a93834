"""The ``millstream`` command: ``worker``, ``bridge``, ``api``, ``demo``, ``bench``, ``simulate``,
``replay``, ``settings``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.settings import Settings, SettingsError, load_settings, settings_doc, settings_markdown

DESCRIPTION = "millstream: factory telemetry from Kafka to ScyllaDB and ClickHouse, nothing lost or doubled."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millstream", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    worker = sub.add_parser(
        "worker",
        help="run a stream-processing worker (faust worker options pass through)",
        add_help=False,
    )
    worker.add_argument("faust_args", nargs=argparse.REMAINDER)
    sub.add_parser(
        "bridge",
        help="forward MQTT to Kafka, acknowledging each message to MQTT only once Kafka has it",
        description="Subscribe to MILLSTREAM_BRIDGE__ROUTES with QoS 1 under a persistent session, produce each "
        "message to Kafka (acks=all, key = the device id), and acknowledge it to MQTT once Kafka has it, in "
        "arrival order. Settings: MILLSTREAM_BRIDGE__* and MILLSTREAM_KAFKA__* (docs/mqtt.md).",
    )
    sub.add_parser(
        "api",
        help="answer the device lookup API from ScyllaDB, in a process apart from the workers",
        description="Serve GET /devices/{id}/latest, /windows and /alerts (docs/api.md) from ScyllaDB on "
        "MILLSTREAM_WEB_HOST:MILLSTREAM_API__WEB_PORT, with /metrics, /healthz and /readyz. Settings: "
        "MILLSTREAM_SCYLLA__* as the workers have them, MILLSTREAM_WINDOWS__SIZES_S, MILLSTREAM_API__WEB_PORT.",
    )
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline locally (bundled broker, embedded ClickHouse) and count what was stored",
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of simulated traffic (default 20)")
    demo.add_argument("--devices", type=int, default=50, help="simulated devices (default 50)")
    demo.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    demo.add_argument(
        "--mqtt", action="store_true",
        help="devices publish over MQTT to a local Mosquitto (needs its binary) and millstream bridge forwards "
        "to Kafka",
    )  # fmt: skip
    _bench_parser(sub)
    _simulate_parser(sub)
    _replay_parser(sub)
    settings = sub.add_parser("settings", help="validate and print the effective settings (secrets masked)")
    group = settings.add_mutually_exclusive_group()
    group.add_argument("--doc", action="store_true", help="list every variable with default and meaning")
    group.add_argument("--markdown", action="store_true", help="the settings table as Markdown")
    return parser


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = sub.add_parser(
        "simulate",
        help="publish realistic factory telemetry to the telemetry topic",
        description="Publish simulated telemetry (flat, nested and batched JSON, with malformed, late and "
        "out-of-order readings) to MILLSTREAM_KAFKA__TELEMETRY_TOPIC, keyed by device id. Deterministic for a seed.",
    )
    simulate.add_argument("--messages", type=int, default=10_000, help="messages to send (default 10000)")
    simulate.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    simulate.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    simulate.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    simulate.add_argument("--malformed", type=float, default=0.02, help="share of malformed messages (default 0.02)")
    simulate.add_argument("--late", type=float, default=0.01, help="share of late messages (default 0.01)")
    simulate.add_argument("--out-of-order", type=float, default=0.02, help="share sent out of order (default 0.02)")
    simulate.add_argument("--batch-size", type=int, default=5, help="readings per batched message (default 5)")
    simulate.add_argument(
        "--profile", choices=("tidy", "unruly"), default="tidy",
        help="tidy: fixed metric sets, one reading a second; unruly: metric sets that change, devices silent "
        "for hours, broken clocks, re-sends, messages at and over MILLSTREAM_LIMITS__MAX_MESSAGE_BYTES, "
        "hours of event time (default tidy)",
    )  # fmt: skip
    simulate.add_argument("--create-topic", action="store_true", help="create the topic if it does not exist")
    simulate.add_argument(
        "--mqtt", default=None, metavar="URL",
        help="publish over MQTT instead (mqtt://host:port, QoS 1, topic devices/<device>/telemetry), for "
        "millstream bridge to forward to Kafka",
    )  # fmt: skip
    simulate.add_argument("--json", action="store_true", help="end with one JSON object on the last line")


def _fail(message: str) -> int:
    print(f"millstream: {message}", file=sys.stderr)
    return 2


def _settings_command(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    if args.doc:
        for env, default, text in settings_doc():
            print(f"{env}={default}\n    {text}")
        return 0
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    # mode="json" renders SecretStr as '**********', so secrets never reach the terminal.
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def _simulate_command(args: argparse.Namespace) -> int:

    from app.tools.simulator import Simulator, UnrulySimulator

    for name in ("messages", "devices", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("malformed", "late", "out_of_order"):
        if not 0 <= getattr(args, name) <= 1:
            return _fail(f"--{name.replace('_', '-')} must be between 0 and 1")
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    options = {
        "devices": args.devices, "seed": args.seed, "malformed_ratio": args.malformed, "late_ratio": args.late,
        "out_of_order_ratio": args.out_of_order, "batch_size": args.batch_size,
    }  # fmt: skip
    simulator: Simulator = (
        UnrulySimulator(**options, max_message_bytes=settings.limits.max_message_bytes)
        if args.profile == "unruly"
        else Simulator(**options)
    )

    def progress(line: str) -> None:
        print(f"millstream simulate: {line}", file=sys.stderr, flush=True)

    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # failures end in our one line below

    try:
        sent = _publish(args, settings, simulator, progress)
    except Exception as exc:  # broker unreachable, auth, ...: one clear line, not a traceback
        where = args.mqtt or ",".join(settings.kafka.bootstrap_servers)
        return _fail(f"could not publish to {where}: {type(exc).__name__}: {exc}")
    log = simulator.log
    summary = {
        "topic": args.mqtt or settings.kafka.telemetry_topic,
        "messages": sent,
        "valid_messages": log.valid_messages,
        "malformed": log.malformed,
        "valid_readings": log.valid_readings,
        "late_readings": sum(1 for r in log.readings if r.late),
        "expected_rows": log.expected_rows,
        "bad_input": log.malformed_kinds,
    }
    print(
        f"sent {sent} messages to {summary['topic']}: {log.valid_messages} valid with {log.valid_readings} readings "
        f"({summary['late_readings']} late), {log.malformed} malformed; expected ClickHouse rows: {log.expected_rows}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _publish(args: argparse.Namespace, settings: Any, simulator: Any, progress: Callable[[str], None]) -> int:
    """The simulator's traffic to Kafka, or over MQTT with ``--mqtt``; how many messages."""
    import asyncio

    from app.tools.simulator import ensure_topic, publish, publish_mqtt

    if args.mqtt:
        if args.create_topic:  # the bridge produces to it; it does not create topics
            asyncio.run(ensure_topic(settings.kafka, progress))
        return publish_mqtt(args.mqtt, simulator, messages=args.messages, rate=args.rate, progress=progress)
    return asyncio.run(
        publish(settings.kafka, simulator, messages=args.messages, rate=args.rate, create_topic=args.create_topic,
                progress=progress)
    )  # fmt: skip


def _replay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser(
        "replay",
        help="re-process a range of the telemetry topic into ClickHouse, or send dead letters back (--dlq)",
        description="Without --dlq: the raw rows of every message in the range into ClickHouse again (idempotent; "
        "aggregates stay with the workers' tables, docs/msk.md#replay). With --dlq: dead letters whose reason is "
        "in --reason back to the telemetry topic, for the workers to process after a fix. Ranges are [from, to) "
        "per partition; the default start is where this command's group got to (else the beginning), the "
        "default end where the partitions ended when it started.",
    )  # fmt: skip
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, default=None, help="first offset, in every chosen partition")
    start.add_argument("--from-time", default=None, help="first record at or after this ISO-8601 time (with zone)")
    end = replay.add_mutually_exclusive_group()
    end.add_argument("--to-offset", type=int, default=None, help="stop before this offset")
    end.add_argument("--to-time", default=None, help="stop before the first record at or after this ISO-8601 time")
    replay.add_argument("--partitions", default=None, help="partitions, comma-separated (default: all)")
    replay.add_argument("--dlq", action="store_true", help="send dead letters back to the telemetry topic")
    replay.add_argument(
        "--reason", default="internal_error", help="with --dlq: reject reasons to send back, comma-separated "
        "(default internal_error)",
    )  # fmt: skip
    replay.add_argument(
        "--group", default=None, help="this command's consumer group (default: the workers' group + -replay or "
        "-dlq-replay); never the workers' own",
    )  # fmt: skip
    replay.add_argument("--json", action="store_true", help="end with one JSON object on the last line")


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure throughput, latency and memory against the goals (bundled broker, one run)",
        description="Produce once, then time: a plain aiokafka consumer, a bare faust agent, the full pipeline "
        "with single-reading and batched messages, and latency at half the pipeline rate. Prints a table; "
        "--json ends with one JSON object.",
    )
    bench.add_argument("--messages", type=int, default=100_000, help="single-reading messages (default 100000)")
    bench.add_argument("--batched-messages", type=int, default=4_000, help="batched messages (default 4000)")
    bench.add_argument("--batch-size", type=int, default=50, help="readings per batched message (default 50)")
    bench.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    bench.add_argument("--latency-seconds", type=float, default=15.0, help="live load for latency (default 15)")
    bench.add_argument(
        "--clickhouse-url", default=None, help="a ClickHouse server (clickhouse://...); default: embedded chdb"
    )
    bench.add_argument(
        "--sweep-devices", default="200,2000,20000,100000",
        help="device counts of the sweep, comma-separated; empty: no sweep (default 200,2000,20000,100000)",
    )  # fmt: skip
    bench.add_argument(
        "--sweep-messages", type=int, default=30_000,
        help="single-reading messages per sweep point, at least one per device (default 30000)",
    )  # fmt: skip
    bench.add_argument(
        "--scylla", default=None, metavar="HOSTS",
        help="ScyllaDB hosts (host[:port],...) for the sweep; default: the CQL test server of a checkout",
    )  # fmt: skip
    bench.add_argument(
        "--api-seconds", type=float, default=60.0,
        help="how long the sweep's lookup API point ingests, queries on and off (default 60)",
    )  # fmt: skip
    bench.add_argument("--json", action="store_true", help="end with one JSON object on the last line")


def _replay_range(args: argparse.Namespace) -> Any:
    """The range the arguments name; raises ValueError with a one-line message."""
    from app.replay import ReplayRange
    from models.times import NoTimeZone, ms_of_iso

    def when(name: str, text: str | None) -> int | None:
        if text is None:
            return None
        try:
            return ms_of_iso(text)
        except NoTimeZone:
            raise ValueError(f"--{name} {text!r}: needs a time zone (Z or +01:00)") from None
        except (ValueError, OverflowError):
            raise ValueError(f"--{name} {text!r}: not an ISO-8601 time (2026-12-03T08:00:00Z)") from None

    try:
        partitions = tuple(int(p) for p in args.partitions.split(",")) if args.partitions else None
    except ValueError:
        raise ValueError(f"--partitions {args.partitions!r}: partition numbers separated by commas") from None
    if any(n < 0 for n in (args.from_offset, args.to_offset, *(partitions or ())) if n is not None):
        raise ValueError("--from-offset, --to-offset and --partitions must not be negative")
    return ReplayRange(args.from_offset, when("from-time", args.from_time), args.to_offset,
                       when("to-time", args.to_time), partitions)  # fmt: skip


def _replay_command(args: argparse.Namespace) -> int:
    import asyncio

    try:
        settings = load_settings()
        span = _replay_range(args)
    except (SettingsError, ValueError) as exc:
        return _fail(f"invalid setting {exc}" if isinstance(exc, SettingsError) else str(exc))
    kafka = settings.kafka
    group = args.group or f"{kafka.consumer_group}-{'dlq-' if args.dlq else ''}replay"
    if group == kafka.consumer_group:
        return _fail(f"--group {group!r} is the workers' consumer group; a replay must not move its offsets")
    refused = _kafka_login_refused(settings)
    if refused:
        return _fail(refused)
    from app.replay import ReplayError, replay_dead_letters, replay_topic

    def progress(line: str) -> None:
        print(f"replay: {line}", file=sys.stderr, flush=True)

    try:
        if args.dlq:
            reasons = frozenset(r.strip() for r in args.reason.split(",") if r.strip())
            report = asyncio.run(replay_dead_letters(settings, span, group, reasons, progress))
        else:
            report = asyncio.run(replay_topic(settings, span, group, progress))
    except ReplayError as exc:
        return _fail(f"replay: {exc}")
    if args.dlq:
        print(f"sent back to {kafka.telemetry_topic}: {report.sent_back} of {report.messages} dead letters; "
              f"skipped: {report.skipped or 'none'}")  # fmt: skip
    else:
        rejected = report.rejected or "none"
        print(f"replayed {report.messages} messages of {report.topic}: {report.rows} ClickHouse rows written "
              f"again; rejected: {rejected}; aggregates unchanged (the workers' tables hold them)")  # fmt: skip
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0


def _kafka_login_refused(settings: Settings) -> str | None:
    """One line if Kafka refuses the configured TLS/SASL login (faust would retry it forever)."""
    if settings.kafka.security_protocol == "PLAINTEXT":
        return None
    import asyncio

    from app.kafka import check_login

    return asyncio.run(check_login(settings.kafka))


def _worker_command(faust_args: list[str]) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    if settings.alerts.rules_file is not None:
        from agents.alerts import RulesError, load_rules

        try:
            load_rules(settings.alerts.rules_file, settings.windows.sizes_s)
        except RulesError as exc:
            return _fail(str(exc))
    refused = _kafka_login_refused(settings)
    if refused:
        return _fail(refused)
    from app.main import collect_garbage_less_often, create_app  # faust is slow to import; only the worker needs it

    app = create_app(settings)
    collect_garbage_less_often()
    faust_level = {"warning": "warn"}.get(settings.log_level, settings.log_level)  # faust's own spelling
    sys.argv = ["millstream worker", "worker", "--loglevel", faust_level, *faust_args]
    app.main()  # faust's click CLI; exits the process
    return 0


def _serve_until_signalled(
    name: str, serve: Callable[[Settings, Any], Awaitable[None]], settings: Settings, quiet: str,
    refusals: tuple[type[Exception], ...] = (),
) -> int:  # fmt: skip
    """``serve(settings, stop)`` with the service's logging until SIGTERM or SIGINT sets ``stop``;
    ``quiet``: a library's logger, silenced (the service logs that library's reconnects itself).
    The web port not to be had (OSError), or one of ``refusals``, is one line and exit 2."""
    import asyncio
    import logging
    import signal

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(quiet).setLevel(logging.CRITICAL)

    async def run() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    caught: tuple[type[Exception], ...] = (OSError, *refusals)
    try:
        asyncio.run(run())
    except caught as exc:
        return _fail(f"{name}: {exc}")
    return 0


def _bridge_command() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    refused = _kafka_login_refused(settings)
    if refused:
        return _fail(refused)
    from app.bridge import serve

    return _serve_until_signalled("bridge", serve, settings, "aiokafka")


def _api_command() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    if not settings.scylla.enabled:
        return _fail("api: MILLSTREAM_SCYLLA__ENABLED is false; millstream api answers from ScyllaDB (without it, "
                     "each worker answers for its own partitions on MILLSTREAM_WEB_PORT)")  # fmt: skip
    from app.api import serve
    from sinks.base import FatalSinkError

    return _serve_until_signalled("api", serve, settings, "cassandra", (FatalSinkError,))


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args_list[:1] == ["worker"]:
        return _worker_command(args_list[1:])
    args = parser.parse_args(args_list)
    if args.command == "settings":
        return _settings_command(args)
    if args.command == "bridge":
        return _bridge_command()
    if args.command == "api":
        return _api_command()
    if args.command == "simulate":
        return _simulate_command(args)
    if args.command == "replay":
        return _replay_command(args)
    if args.command == "bench":
        if min(args.messages, args.batched_messages, args.batch_size, args.devices) < 1 or args.latency_seconds <= 0:
            return _fail("--messages, --batched-messages, --batch-size and --devices must be at least 1, "
                         "--latency-seconds positive")  # fmt: skip
        try:
            sweep = tuple(int(d) for d in args.sweep_devices.split(",") if d.strip())
        except ValueError:
            return _fail(f"--sweep-devices {args.sweep_devices!r}: device counts separated by commas")
        if any(d < 1 for d in sweep) or args.sweep_messages < 1:
            return _fail("--sweep-devices counts and --sweep-messages must be at least 1")
        if not 0 < args.api_seconds <= 3600:
            return _fail("--api-seconds must be above 0 and at most 3600")
        from app.tools.bench import BenchOptions, run_bench

        options = BenchOptions(
            messages=args.messages, batched_messages=args.batched_messages, batch_size=args.batch_size,
            devices=args.devices, latency_seconds=args.latency_seconds, clickhouse_url=args.clickhouse_url,
            sweep_devices=sweep, sweep_messages=args.sweep_messages, scylla=args.scylla,
            api_seconds=args.api_seconds,
        )  # fmt: skip
        return run_bench(options, args.json)
    if args.command == "demo":
        if args.duration <= 0 or args.devices < 1:
            return _fail("--duration must be positive and --devices at least 1")
        from app.tools.demo import run_demo

        return run_demo(args.duration, args.devices, args.json, mqtt=args.mqtt)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    raise SystemExit(main())
