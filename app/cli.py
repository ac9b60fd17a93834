"""The ``millstream`` command: ``worker`` and ``settings`` (more as they are built)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from app.settings import SettingsError, load_settings, settings_doc, settings_markdown

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
    settings = sub.add_parser("settings", help="validate and print the effective settings (secrets masked)")
    group = settings.add_mutually_exclusive_group()
    group.add_argument("--doc", action="store_true", help="list every variable with default and meaning")
    group.add_argument("--markdown", action="store_true", help="the settings table as Markdown")
    return parser


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


def _worker_command(faust_args: list[str]) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    from app.main import create_app  # faust is slow to import; only the worker needs it

    app = create_app(settings)
    sys.argv = ["millstream worker", "worker", "--loglevel", settings.log_level, *faust_args]
    app.main()  # faust's click CLI; exits the process
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args_list[:1] == ["worker"]:
        return _worker_command(args_list[1:])
    args = parser.parse_args(args_list)
    if args.command == "settings":
        return _settings_command(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    raise SystemExit(main())
